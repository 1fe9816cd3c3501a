"""SSHTransport itself (adapterctl/transports/ssh.py): argument protection for rsync, ProxyJump
chains, lost connections, ControlMaster dirs of killed runs.

The fast tests need no sshd. The `heavy` ones run three real sshd hosts on loopback
(tests/sshhosts.py): hop-a, hop-b and target. Each host accepts only its own client key, so a
ProxyJump path works only if every hop's own ssh_config entry was used.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import sshhosts
from test_serving import wait_for

from adapterctl.errors import TransportError, UsageError
from adapterctl.transports import ssh
from adapterctl.transports.ssh import (
    SSHOptions,
    SSHTransport,
    remove_stale_control_dirs,
    stale_control_dirs,
)

SPECS = [("hop-a", False), ("hop-b", False), ("target", False)]
RELAY_ADDRESS = "127.0.0.250"  # the "network" in front of target (TcpRelay)
needs_sshd = pytest.mark.skipif(
    not (os.geteuid() == 0 and os.access(sshhosts.SSHD, os.X_OK) and shutil.which("rsync")),
    reason="needs root, /usr/sbin/sshd and rsync",
)


def sshd_test(fn):
    """A test against the real sshd hosts: heavy, and with only their SSH setup in the environment."""
    return pytest.mark.heavy(needs_sshd(pytest.mark.usefixtures("clean_env")(fn)))


# -- fast: no sshd ---------------------------------------------------------------------------------
def test_proxyjump_entries_parse_like_openssh():
    assert ssh._parse_hop("hop") == (None, "hop", None)
    assert ssh._parse_hop(" alice@hop:2222 ") == ("alice", "hop", 2222)
    assert ssh._parse_hop("ssh://bob@hop:23/") == ("bob", "hop", 23)
    assert ssh._parse_hop("[::1]:2200") == (None, "::1", 2200)
    assert ssh._parse_hop("a@b@hop") == ("a@b", "hop", None)
    for bad in ("", "user@", "hop:22x"):
        with pytest.raises(UsageError, match="ProxyJump"):
            ssh._parse_hop(bad)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_route_takes_every_hop_in_order_each_with_its_own_config(tmp_path):
    """`ProxyJump a,b`: a (reached through its own ProxyJump z), then b, each resolved from its
    own entry; an inline user@host:port wins over the entry, as on OpenSSH's command line."""
    cfg = _write(
        tmp_path / "ssh_config",
        """\
Host t
    HostName 127.0.0.30
    Port 2203
    ProxyJump a,carol@b:2299
Host a
    HostName 127.0.0.31
    Port 2201
    User alice
    IdentityFile ~/keys/a
    UserKnownHostsFile ~/kh_a
    ProxyJump z
Host b
    HostName 127.0.0.32
    Port 2202
    User bob
    ProxyJump never-used
Host z
    HostName 127.0.0.33
Host loop
    ProxyJump loop
""",
    )
    tr = SSHTransport("ep", "t", SSHOptions(ssh_config=cfg))
    route = tr._route(tr.spec)
    assert [(h.alias, h.hostname, h.port, h.user) for h in route] == [
        ("z", "127.0.0.33", 22, None),
        ("a", "127.0.0.31", 2201, "alice"),
        ("b", "127.0.0.32", 2299, "carol"),
    ]
    assert route[1].identity_files == (os.path.expanduser("~/keys/a"),)
    assert route[1].known_hosts == (os.path.expanduser("~/kh_a"),)
    looping = SSHTransport("ep", "loop", SSHOptions(ssh_config=cfg))
    with pytest.raises(UsageError, match="loop"):
        looping._route(looping.spec)


def test_rsync_environment_always_protects_arguments(monkeypatch):
    monkeypatch.setenv("RSYNC_OLD_ARGS", "1")
    monkeypatch.setenv("RSYNC_PROTECT_ARGS", "0")
    env = ssh._rsync_env()
    assert "RSYNC_OLD_ARGS" not in env and env["RSYNC_PROTECT_ARGS"] == "1"
    assert env["PATH"] == os.environ["PATH"]


def test_rsync_failures_name_a_lost_link_and_keep_the_specific_hints(tmp_path):
    tr = SSHTransport("ep", "h", SSHOptions(ssh_config=_write(tmp_path / "c", "Host h\n    Port 2200\n")))
    lost = tr._rsync_error(
        12,
        "rsync: connection unexpectedly closed (1000 bytes received so far) [sender]\n"
        "rsync error: error in rsync protocol data stream (code 12) at io.c(232)\n",
    )
    assert "endpoint ep" in lost.message and "lost the SSH connection to h ([h]:2200)" in lost.message
    assert "rerun" in lost.hint and "python3" not in str(lost)
    assert "lost" in tr._rsync_error(255, "client_loop: send disconnect: Broken pipe\n").message
    # the same closed connection, but for a reason that has its own fix
    for text, hint in (
        ("Host key verification failed.\nrsync: connection unexpectedly closed", "host key"),
        ("rsync: write failed: No space left on device (28)\nconnection unexpectedly closed", "disk is full"),
        ("rsync: mkstemp failed: Permission denied (13)\nBroken pipe", "permissions"),
    ):
        err = tr._rsync_error(12, text)
        assert "rsync failed (exit 12)" in err.message and hint in err.hint, err
    assert "lost" not in tr._rsync_error(23, "some files could not be transferred: Broken pipe").message


def test_connections_notice_a_dead_link(tmp_path):
    """paramiko's socket: TCP keepalive and (Linux) a bound on unacknowledged data; OpenSSH:
    ServerAlive probes. A silently dropped network ends the connection instead of hanging."""
    options = SSHOptions(keepalive_s=7, keepalive_count=3)
    with socket.create_server(("127.0.0.1", 0)) as server:
        spec = ssh.HostSpec("h", "127.0.0.1", server.getsockname()[1], None, (), False, (), None, None)
        with ssh._open_socket(spec, options) as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            if hasattr(socket, "TCP_KEEPIDLE"):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 28_000
    argv = " ".join(ssh.ssh_command(spec, options, None))
    assert "ServerAliveInterval=7" in argv and "ServerAliveCountMax=3" in argv


def _dead_pid() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except OSError:
        return 99_999_999


def test_stale_control_dirs_are_those_of_dead_runs_and_old_format_ones_after_an_hour(tmp_path):
    live = tmp_path / f"adctl-{os.getpid()}-abc123"
    dead = tmp_path / f"adctl-{_dead_pid()}-xyz_9"
    old = tmp_path / "adctl-k2j4h5g6"
    old_fresh = tmp_path / "adctl-a1b2c3d4"
    for d in (live, dead, old, old_fresh):
        d.mkdir()
    (dead / "cm.log").write_bytes(b"12345")
    (tmp_path / f"adctl-{_dead_pid()}-file").write_text("not a dir")
    (tmp_path / f"adctl-{_dead_pid()}-link").symlink_to(dead)
    (tmp_path / "other-dir").mkdir()
    hour_ago = time.time() - 3700
    os.utime(old, (hour_ago, hour_ago))
    expected = [(dead, 5), (old, 0)]
    if os.path.exists("/proc/1/stat"):  # pid 1 started after this dir last changed: a reused pid
        reused = tmp_path / "adctl-1-reused"
        reused.mkdir()
        os.utime(reused, (0, 0))
        expected.append((reused, 0))
    assert stale_control_dirs(tmp_path) == sorted(expected)
    assert remove_stale_control_dirs(tmp_path) == sorted(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, old_fresh.name, "other-dir", f"adctl-{_dead_pid()}-file", f"adctl-{_dead_pid()}-link"]
    )
    assert stale_control_dirs(tmp_path) == []


def test_a_new_control_dir_carries_the_pid_and_sweeps_those_of_killed_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(ssh.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(ssh, "_swept_control_dirs", False)
    dead = tmp_path / f"adctl-{_dead_pid()}-left"
    dead.mkdir()
    tr = SSHTransport("ep", "h", SSHOptions(ssh_config=_write(tmp_path / "c", "Host h\n")))
    path = Path(tr._control_path())
    assert path.name == "cm" and path.parent.parent == tmp_path
    assert path.parent.name.startswith(f"adctl-{os.getpid()}-")
    assert not dead.exists() and stale_control_dirs(tmp_path) == []
    shutil.rmtree(path.parent)  # close() would also ask ssh to stop a master: none was started


# -- real sshd hosts ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    yield from sshhosts.hosts_fixture_factory(tmp_path_factory, SPECS, basename="hops")


@pytest.fixture
def clean_env(monkeypatch):
    """Only the test hosts' SSH setup: no agent, no RSYNC_RSH."""
    for var in ("SSH_AUTH_SOCK", "SSH_AGENT_PID", "RSYNC_RSH"):
        monkeypatch.delenv(var, raising=False)


def host_entry(alias: str, host, address: str, port: int, known_hosts: Path, extra: str = "") -> str:
    return f"""\
Host {alias}
    HostName {address}
    Port {port}
    User root
    IdentityFile {host.client_key}
    IdentitiesOnly yes
    UserKnownHostsFile {known_hosts}
    StrictHostKeyChecking yes
{extra}"""


def config_with(hosts, path: Path, *entries: str) -> Path:
    """The hosts' ssh_config with `entries` first (first obtained value wins)."""
    return _write(path, "".join(entries) + hosts.ssh_config.read_text())


def transport(cfg: Path, alias: str, **opts) -> SSHTransport:
    return SSHTransport("ep", alias, SSHOptions(ssh_config=cfg, **opts))


def in_thread(fn, *args, **kw) -> tuple[threading.Thread, dict]:
    """Run fn in a thread; the dict gets "result" or "error"."""
    out: dict = {}

    def body():
        try:
            out["result"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


def fifo_writer(fifo: Path) -> int | None:
    """A write end of `fifo` once someone (an endpoint op) has it open for reading, else None.
    Keep it open: closing it ends the reader's read."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise


def assert_lost(exc: BaseException | None, *needles: str) -> None:
    assert isinstance(exc, TransportError), repr(exc)
    text = str(exc)
    assert "endpoint ep" in text and "lost the SSH connection to" in text, text
    assert "rerun the command: it resumes" in text and "python3 stopped" not in text, text
    for needle in needles:
        assert needle in text, text


def local_port(tr: SSHTransport) -> int:
    return tr._client.get_transport().sock.getsockname()[1]


@sshd_test
def test_rsync_sends_shell_metacharacters_verbatim_even_with_RSYNC_OLD_ARGS(hosts, tmp_path, monkeypatch):
    monkeypatch.setenv("RSYNC_OLD_ARGS", "1")
    target = hosts["target"]
    names = [
        "x;touch PWNED;y",
        "$(touch PWNED2)",
        "`touch PWNED3`",
        "a b  c",
        "q'uote\"d",
        "-rf",
        "star*?[ab]",
        "back\\slash & amp | pipe > gt",
    ]
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(names):
        (src / name).write_bytes(f"{i}:{name}".encode())
    dest = target.root / f"t-{uuid.uuid4().hex[:8]}" / "dest $(touch PWNED4); 'q' `touch PWNED5` [ab]*? \\x"
    dest.mkdir(parents=True)
    with transport(hosts.ssh_config, "target") as tr:
        result = tr.sync_files(src, str(dest), names)
        assert Path(tr._control_dir).name.startswith(f"adctl-{os.getpid()}-")
        control_dir = Path(tr._control_dir)
    assert not control_dir.exists()
    assert result.files_sent == len(names)
    assert sorted(p.name for p in dest.iterdir()) == sorted(names)
    for i, name in enumerate(names):
        assert (dest / name).read_bytes() == f"{i}:{name}".encode()
    pwned = [p for root in (hosts.dir, tmp_path, Path.cwd()) for p in root.rglob("PWNED*")]
    assert pwned == []


@sshd_test
def test_proxyjump_chain_takes_every_hop_for_paramiko_rsync_and_ssh(hosts, tmp_path):
    target = hosts["target"]
    cfg = config_with(
        hosts,
        tmp_path / "ssh_config",
        host_entry(
            "t-via-ab",
            target,
            target.address,
            target.port,
            hosts.known_hosts,
            "    ProxyJump hop-a,hop-b\n",
        ),
    )
    dest = target.root / f"t-{uuid.uuid4().hex[:8]}"
    dest.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"weights" * 1000)
    with transport(cfg, "t-via-ab") as tr:
        # paramiko: we → hop-a → hop-b → target, each hop an sshd child of the one before
        rc, out, _err = tr._exec("echo $TESTHOSTS_ALIAS")
        assert (rc, out) == (0, b"target\n")
        assert tr.call("read_json", path=str(dest / "missing.json")) is None
        assert len(tr._hops) == 2
        assert os.getpid() in hosts.clients("hop-a")
        assert hosts.clients("hop-b") and hosts.clients("hop-b") <= hosts.serving("hop-a")
        assert hosts.clients("target") and hosts.clients("target") <= hosts.serving("hop-b")
        assert os.getpid() not in hosts.clients("hop-b") | hosts.clients("target")
        # OpenSSH (spawn, rsync) follows the same ProxyJump from the same ssh_config
        proc = tr.spawn(["sh", "-c", 'echo "$TESTHOSTS_ALIAS"; read line; echo "got $line"'])
        assert proc.stdout.readline() == b"target\n"
        assert hosts.clients("target") <= hosts.serving("hop-b")
        ssh_clients = hosts.clients("hop-a") - {os.getpid()}
        assert ssh_clients, "OpenSSH did not go through hop-a"
        assert all(Path(f"/proc/{p}/comm").read_text().strip() == "ssh" for p in ssh_clients)
        out, err = proc.communicate(b"bye\n", timeout=30)
        assert (proc.returncode, out) == (0, b"got bye\n"), err
        assert tr.sync_files(src, str(dest), ["w.bin"]).files_sent == 1
    assert (dest / "w.bin").read_bytes() == (src / "w.bin").read_bytes()


@sshd_test
@pytest.mark.parametrize("hop", ["hop-a", "hop-b"])
def test_every_hop_host_key_is_checked(hosts, tmp_path, hop):
    target = hosts["target"]
    known = tmp_path / "known_hosts"
    lines = hosts.known_hosts.read_text().splitlines(keepends=True)
    missing = hosts[hop].known_hosts_name
    known.write_text("".join(ln for ln in lines if not ln.startswith(missing + " ")))
    cfg = _write(
        tmp_path / "ssh_config",
        "".join(
            host_entry(a, hosts[a], hosts[a].address, hosts[a].port, known)
            for a in ("hop-a", "hop-b", "target")
        )
        + host_entry("t-via-ab", target, target.address, target.port, known, "    ProxyJump hop-a,hop-b\n"),
    )
    with transport(cfg, "t-via-ab") as tr, pytest.raises(TransportError) as caught:
        tr._connect()
    assert f"host key of jump host {hop} {missing} is unknown" in str(caught.value)
    assert "--accept-new-host-keys" in str(caught.value)
    assert missing not in known.read_text()
    with transport(cfg, "t-via-ab", accept_new_host_keys=True) as tr:
        assert tr.run(["true"]).ok
    assert f"{missing} {hosts[hop].host_pubkey}" in known.read_text()


@sshd_test
def test_sshd_killed_mid_operation_says_connection_lost_and_the_next_call_reconnects(hosts, tmp_path):
    target = hosts["target"]
    fifo = target.home / f"fifo-{uuid.uuid4().hex[:8]}"
    os.mkfifo(fifo)
    with transport(hosts.ssh_config, "target") as tr:
        assert tr.call("read_json", path=str(fifo) + ".none") is None
        first = tr._client
        t, out = in_thread(tr.call, "read_json", path=str(fifo))
        writer = wait_for(lambda: fifo_writer(fifo), "the op to open the fifo", timeout=30.0)
        assert hosts.kill_connections("target", local_port(tr))
        t.join(timeout=60)
        os.close(writer)
        assert not t.is_alive()
        assert_lost(out.get("error"), "endpoint ep (root@target)", "target (", "while running read_json")
        # the next call connects again: a new client and a new agent
        assert tr.call("read_json", path=str(fifo) + ".none") is None
        assert tr._client is not None and tr._client is not first

        # the same for a remote command (`run`)
        t, out = in_thread(tr.run, ["sleep", "4321.5"])
        sleeper = wait_for(lambda: _processes_with_args(b"sleep\x004321.5"), "the remote sleep", timeout=30.0)
        hosts.kill_connections("target", local_port(tr))
        t.join(timeout=60)
        for pid in sleeper:
            os.kill(pid, signal.SIGKILL)
        assert_lost(out.get("error"), "while running `sleep 4321.5`")
        assert tr.run(["echo", "back"]).stdout == "back\n"
    fifo.unlink()


@sshd_test
def test_network_drop_mid_operation_and_while_idle(hosts, tmp_path):
    target = hosts["target"]
    with sshhosts.TcpRelay(RELAY_ADDRESS, (target.address, target.port)) as relay:
        cfg = relay_config(hosts, relay, tmp_path)
        fifo = target.home / f"fifo-{uuid.uuid4().hex[:8]}"
        os.mkfifo(fifo)
        with transport(cfg, "target-relay") as tr:
            assert tr.call("read_json", path=str(fifo) + ".none") is None
            t, out = in_thread(tr.call, "read_json", path=str(fifo))
            writer = wait_for(lambda: fifo_writer(fifo), "the op to open the fifo", timeout=30.0)
            assert relay.cut() == 1
            t.join(timeout=60)
            os.close(writer)
            assert_lost(out.get("error"), f"[{relay.address}]:{relay.port}")
            assert tr.call("read_json", path=str(fifo) + ".none") is None  # reconnected
            # dropped between two calls: the next one just connects again (nothing was sent)
            transport_before = tr._client.get_transport()
            assert relay.cut() == 1
            wait_for(lambda: not transport_before.is_active(), "paramiko to see the drop", timeout=30.0)
            assert tr.call("read_json", path=str(fifo) + ".none") is None
            assert relay.cuts == 2
        fifo.unlink()


@sshd_test
def test_link_dropped_during_rsync_says_so_and_a_rerun_finishes(hosts, tmp_path):
    target = hosts["target"]
    src = tmp_path / "src"
    src.mkdir()
    blob = os.urandom(24 * 1024 * 1024)
    (src / "adapter.bin").write_bytes(blob)
    dest = target.root / f"t-{uuid.uuid4().hex[:8]}"
    dest.mkdir()
    with sshhosts.TcpRelay(RELAY_ADDRESS, (target.address, target.port)) as relay:
        cfg = relay_config(hosts, relay, tmp_path)
        with transport(cfg, "target-relay") as tr:
            tr._connect()
            relay.cut_after(4 * 1024 * 1024)  # mid-file
            with pytest.raises(TransportError) as caught:
                tr.sync_files(src, str(dest), ["adapter.bin"])
            assert_lost(caught.value, "while sending files with rsync", "rsync exit")
            assert relay.cuts >= 1
            assert not (dest / "adapter.bin").exists()  # nothing truncated under the final name
            tr.sync_files(src, str(dest), ["adapter.bin"])
    digest = hashlib.sha256(blob).hexdigest()
    assert hashlib.sha256((dest / "adapter.bin").read_bytes()).hexdigest() == digest


def relay_config(hosts, relay: sshhosts.TcpRelay, tmp_path: Path) -> Path:
    """`target-relay`: the target host reached through `relay` (known under the relay's address)."""
    target = hosts["target"]
    known = tmp_path / "known_hosts_relay"
    known.write_text(f"[{relay.address}]:{relay.port} {target.host_pubkey}\n")
    entry = host_entry("target-relay", target, relay.address, relay.port, known)
    return config_with(hosts, tmp_path / "ssh_config_relay", entry)


def _processes_with_args(args: bytes) -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if Path(f"/proc/{name}/cmdline").read_bytes().rstrip(b"\0") == args:
                    found.add(int(name))
            except OSError:
                pass
    return found
