"""Real SSH endpoints for tests: several `sshd` instances on this machine, each one a "host".

Every host has its own loopback address (127.0.0.10, .11, ...), port, ed25519 host key,
client key pair (its authorized_keys holds only that host's client key), home directory and
adapter_dir. BSD-like hosts emulate a Mac's userland: a restricted PATH without GNU-only
programs (no sha256sum), wrappers that reject GNU-only flags (`mv -T`, `readlink -f`, `stat -c`,
`sed -i` without a suffix, ...) and `uname` reporting Darwin.

    hosts = start_hosts(tmp / "hosts", [("mac-1", True), ("linux-1", False)])
    with hosts:
        subprocess.run(["ssh", "mac-1", "true"], env=hosts.env(), check=True)

`TestHosts.env()` gives subprocesses HOME=<dir>/home (whose .ssh/config and known_hosts are the
generated ones) and puts <dir>/bin first on PATH. <dir>/bin/ssh wraps /usr/bin/ssh with
`-F <dir>/ssh_config`, because OpenSSH reads ~/.ssh from the passwd entry, never from $HOME;
rsync finds that wrapper through PATH. Nothing ever reads the developer's real ~/.ssh.

Behaviour of the hosts worth knowing:
- Sessions run through a ForceCommand (`session.sh` in the host dir) that cd's to the host's
  home before running the command: sshd itself chdir's to the passwd home (/root), where a
  relative path (`rsync src/ host:dest/`) would land on the real machine, shared by all hosts.
  SFTP therefore uses the external sftp-server (started by that wrapper, so relative SFTP paths
  are relative to the host's home too); `internal-sftp` cannot run under a ForceCommand script.
- HOME, PATH, SHELL and TESTHOSTS_* come from sshd_config `SetEnv` (OpenSSH >= 8.7).
- Commands run under bash on Linux-like hosts (root's login shell) and under zsh (if
  installed) or else /bin/sh (dash) on BSD-like hosts, so bashisms fail there.
- Every process started through a host carries TESTHOSTS_ID=<token> in its environment;
  `stop()` ends those too (e.g. a server a test started with nohup), each by PID.

Faults and paths, for tests that must prove which way a connection went or cut it:
- `hosts.clients(alias)`: the PIDs holding the client end of each connection to that host (a
  hop's sshd for a ProxyJump path); `hosts.serving(alias)`: that host's sshd processes.
- `hosts.kill_connections(alias, client_port)`: SIGKILL the sshd processes serving a connection,
  as a crashed or killed sshd child would.
- `TcpRelay(address, (host, port))`: a relay standing in for the network; `cut()` (or
  `cut_after(n)` relayed bytes) drops every connection through it, as a dropped link does.

Standard library only; runs ssh-keygen and /usr/sbin/sshd.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SSH = "/usr/bin/ssh"
SFTP_SERVER_CANDIDATES = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
)
LINUX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FIRST_OCTET = 10  # hosts listen on 127.0.0.10, 127.0.0.11, ...
START_TIMEOUT_S = 10.0
MARKER_VAR = "TESTHOSTS_ID"
STATE_FILE = "pids.json"

# What a Mac has on PATH (symlinked to this machine's tools). Deliberately absent: sha256sum,
# md5sum, sha1sum, b2sum and the other GNU coreutils-only programs.
_BSD_TOOL_NAMES = """sh zsh env rsync shasum perl cat ls mkdir rm chmod df test true false kill ps id
whoami hostname sleep head tail wc tr cut sort grep awk find xargs dd scp sftp ssh"""
BSD_TOOLS = tuple(_BSD_TOOL_NAMES.split())  # plus python3 and the wrappers: mv cp ln stat readlink sed uname

_SAFE_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class TestHost:
    __test__ = False  # not a pytest test class

    alias: str
    address: str  # 127.0.0.N
    port: int
    root: Path  # the host's private dir (config, keys, log, home, adapters)
    home: Path  # $HOME and the working directory of every session
    adapter_dir: Path  # root/adapters, not created
    host_pubkey: str  # "ssh-ed25519 AAAA..."
    client_key: Path  # private key accepted by this host (and only this host)
    sshd_pid: int
    bsd: bool
    sshd_config: Path = field(repr=False, default=Path())
    log: Path = field(repr=False, default=Path())
    proc: subprocess.Popen | None = field(repr=False, default=None, compare=False)

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH and paramiko look this host up under in known_hosts."""
        return f"[{self.address}]:{self.port}"


@dataclass
class TestHosts:
    __test__ = False

    dir: Path
    ssh_config: Path
    known_hosts: Path
    hosts: dict[str, TestHost]
    marker: str = field(repr=False, default="")

    def __getitem__(self, alias: str) -> TestHost:
        return self.hosts[alias]

    def env(self) -> dict[str, str]:
        """Environment for subprocesses that must only see the test hosts' SSH setup."""
        env = dict(os.environ)
        for var in ("SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_ASKPASS", "SSH_ASKPASS_REQUIRE", "RSYNC_RSH"):
            env.pop(var, None)
        env["HOME"] = str(self.dir / "home")
        env["PATH"] = os.pathsep.join([str(self.dir / "bin"), env.get("PATH", os.defpath)])
        env["TESTHOSTS_SSH_CONFIG"] = str(self.ssh_config)
        return env

    def ssh_argv(self, alias: str, *command: str) -> list[str]:
        """argv for `ssh` to `alias` using only the generated config."""
        return [SSH, "-F", str(self.ssh_config), alias, *command]

    def serving(self, alias: str) -> set[int]:
        """PIDs of `alias`'s sshd processes (its listener and everything under it)."""
        root = self.hosts[alias].sshd_pid
        return descendants(root) | {root}

    def clients(self, alias: str) -> set[int]:
        """PIDs holding the client end of an established connection to `alias`'s sshd."""
        host = self.hosts[alias]
        return tcp_clients(host.address, host.port)

    def kill_connections(self, alias: str, client_port: int | None = None, timeout: float = 10.0) -> set[int]:
        """SIGKILL the sshd processes serving connections to `alias` (only the one from local port
        `client_port`, if given), as a crashed sshd child would; returns them once they are gone."""
        host = self.hosts[alias]
        inodes = {
            inode
            for local, remote, state, inode in _tcp_sockets()
            if local == (host.address, host.port)
            and state == _TCP_ESTABLISHED
            and (client_port is None or remote[1] == client_port)
        }
        victims = {pid for pid in _socket_owners(inodes) if pid in descendants(host.sshd_pid)}
        for pid in victims:
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in victims):
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd processes {sorted(victims)} of {alias} survived SIGKILL")
            if host.proc is not None:
                host.proc.poll()
            time.sleep(0.01)
        return victims

    def stop(self) -> None:
        """End every process these hosts started (listeners, sessions, their children), by PID."""
        procs = [h.proc for h in self.hosts.values() if h.proc is not None]
        _stop(
            self.marker,
            [h.sshd_pid for h in self.hosts.values()],
            [str(h.sshd_config) for h in self.hosts.values()],
            procs,
        )
        with contextlib.suppress(OSError):
            (self.dir / STATE_FILE).unlink()

    def __enter__(self) -> TestHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# starting


def start_hosts(dir: Path, specs: list[tuple[str, bool]], *, die_with_parent: bool = True) -> TestHosts:
    """Start one sshd per (alias, bsd_like) spec under `dir`; see the module docstring.

    With die_with_parent (Linux), each sshd listener gets SIGTERM if the process that started it
    exits, so a killed test run does not leave listeners behind.
    """
    dir = Path(dir).absolute()
    _check_path(dir)
    if not specs:
        raise ValueError("no hosts requested")
    aliases = [alias for alias, _ in specs]
    for alias in aliases:
        if not _SAFE_ALIAS.match(alias):
            raise ValueError(f"bad host alias {alias!r}")
    if len(set(aliases)) != len(aliases):
        raise ValueError(f"duplicate host alias in {aliases}")
    if len(specs) > 255 - FIRST_OCTET:
        raise ValueError("too many hosts")
    _require_setenv_support()
    if (dir / STATE_FILE).exists():
        state = json.loads((dir / STATE_FILE).read_text())
        configs = [h["config"] for h in state["hosts"].values()]
        if find_processes(state["marker"], configs, [h["pid"] for h in state["hosts"].values()]):
            raise RuntimeError(f"test hosts from an earlier start still run in {dir}; stop_dir() them first")
    dir.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # sshd's privsep dir

    marker = secrets.token_hex(12)
    hosts: dict[str, TestHost] = {}
    keygens: list[subprocess.Popen] = []
    for i, (alias, bsd) in enumerate(specs):
        root = dir / "hosts" / alias
        root.mkdir(parents=True, exist_ok=True)
        home = root / "home"
        home.mkdir(exist_ok=True)
        for key in (root / "ssh_host_ed25519_key", root / "client_ed25519"):
            for p in (key, key.with_name(key.name + ".pub")):
                p.unlink(missing_ok=True)
            argv = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"testhosts-{alias}", "-f", str(key)]
            keygens.append(
                subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                )
            )
        hosts[alias] = TestHost(
            alias=alias,
            address=f"127.0.0.{FIRST_OCTET + i}",
            port=0,
            root=root,
            home=home,
            adapter_dir=root / "adapters",
            host_pubkey="",
            client_key=root / "client_ed25519",
            sshd_pid=0,
            bsd=bsd,
            sshd_config=root / "sshd_config",
            log=root / "sshd.log",
        )
    for kg in keygens:
        out = kg.communicate(timeout=30)[0]
        if kg.returncode != 0:
            raise RuntimeError(f"ssh-keygen failed: {out.decode(errors='replace')}")

    result = TestHosts(
        dir=dir, ssh_config=dir / "ssh_config", known_hosts=dir / "known_hosts", hosts=hosts, marker=marker
    )
    try:
        for host in hosts.values():
            host.host_pubkey = " ".join((host.root / "ssh_host_ed25519_key.pub").read_text().split()[:2])
            pub = (host.root / "client_ed25519.pub").read_text()
            (host.root / "authorized_keys").write_text(pub)
            os.chmod(host.root / "authorized_keys", 0o600)
            shell = _bsd_shell() if host.bsd else "/bin/bash"
            if host.bsd:
                _make_bsdbin(host.root / "bsdbin")
            _write_session_script(host.root / "session.sh", shell)
        _start_all(list(hosts.values()), marker, die_with_parent)
        _write_client_files(result)
        _write_state(result)
    except BaseException:
        result.stop()
        raise
    return result


def hosts_fixture_factory(
    tmp_path_factory, specs: list[tuple[str, bool]], basename: str = "sshhosts"
) -> Iterator[TestHosts]:
    """Body for a pytest fixture: `yield from hosts_fixture_factory(tmp_path_factory, specs)`."""
    hosts = start_hosts(tmp_path_factory.mktemp(basename), specs)
    try:
        yield hosts
    finally:
        hosts.stop()


def _check_path(path: Path) -> None:
    # sshd_config/ssh_config expand % and ~ in key/known_hosts paths, and we quote with "..."
    if any(c in str(path) for c in '%"\n\\'):
        raise ValueError(f'test host dir must not contain % " \\ or newlines: {path}')


def _openssh_version() -> tuple[int, int]:
    out = subprocess.run([SSHD, "-V"], capture_output=True, text=True).stderr
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot tell the OpenSSH version of {SSHD}: {out!r}")
    return int(m.group(1)), int(m.group(2))


def _require_setenv_support() -> None:
    if not os.access(SSHD, os.X_OK):
        raise RuntimeError(f"{SSHD} not found (install openssh-server)")
    if _openssh_version() < (8, 7):
        raise RuntimeError("sshd_config SetEnv needs OpenSSH >= 8.7")


def _q(value: str | Path) -> str:
    """Quote a value for sshd_config/ssh_config."""
    s = str(value)
    return f'"{s}"' if any(c.isspace() for c in s) or not s else s


def _bsd_shell() -> str:
    zsh = shutil.which("zsh", path=LINUX_PATH)
    return zsh or "/bin/sh"


def _sftp_server() -> str:
    for cand in SFTP_SERVER_CANDIDATES:
        if os.access(cand, os.X_OK):
            return cand
    raise RuntimeError("no sftp-server binary found")


def _sshd_config(host: TestHost, marker: str) -> str:
    env = {
        "HOME": str(host.home),
        "PATH": str(host.root / "bsdbin") if host.bsd else LINUX_PATH,
        "SHELL": _bsd_shell() if host.bsd else "/bin/bash",
        MARKER_VAR: marker,
        "TESTHOSTS_ALIAS": host.alias,
    }
    setenv = " ".join(_q(f"{k}={v}") for k, v in env.items())
    lines = [
        f"# test host {host.alias} (tests/sshhosts.py); bsd_like={host.bsd}",
        f"ListenAddress {host.address}",
        f"Port {host.port}",
        f"HostKey {_q(host.root / 'ssh_host_ed25519_key')}",
        f"PidFile {_q(host.root / 'sshd.pid')}",
        f"AuthorizedKeysFile {_q(host.root / 'authorized_keys')}",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "HostbasedAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        "StrictModes no",
        "UsePAM no",
        "AllowTcpForwarding yes",
        "PermitUserEnvironment no",
        "X11Forwarding no",
        "PrintMotd no",
        "PrintLastLog no",
        "UseDNS no",
        "LogLevel ERROR",
        "MaxSessions 64",
        "MaxStartups 64:30:128",
        f"SetEnv {setenv}",
        f"Subsystem sftp {_sftp_server()}",
        # sshd chdir's to the passwd home (/root); the wrapper moves the session to $HOME
        f"ForceCommand exec /bin/sh {shlex.quote(str(host.root / 'session.sh'))}",
    ]
    if _openssh_version() >= (9, 8):
        lines.append("PerSourcePenalties no")  # failed-auth tests must not lock out 127.0.0.x
    return "\n".join(lines) + "\n"


def _write_session_script(path: Path, shell: str) -> None:
    path.write_text(f"""\
#!/bin/sh
# ForceCommand of a test host (tests/sshhosts.py). sshd starts sessions in the passwd home
# (/root); a real host starts them in the user's home, so go to $HOME (set by SetEnv) and run
# the client's command with this host's shell, as sshd would have.
cd "$HOME" || {{ echo "test host: cannot cd to $HOME" >&2; exit 1; }}
if [ -z "${{SSH_ORIGINAL_COMMAND+x}}" ]; then
    exec {shell}
fi
exec {shell} -c "$SSH_ORIGINAL_COMMAND"
""")
    path.chmod(0o755)


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _preexec_die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _spawn_sshd(host: TestHost, marker: str, die_with_parent: bool) -> subprocess.Popen:
    host.port = _free_port(host.address)
    host.sshd_config.write_text(_sshd_config(host, marker))
    pidfile = host.root / "sshd.pid"
    pidfile.unlink(missing_ok=True)
    env = {"PATH": LINUX_PATH, "LANG": "C.UTF-8", MARKER_VAR: marker}
    with open(host.log, "ab") as log:
        return subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(host.sshd_config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd="/",
            start_new_session=True,
            preexec_fn=_preexec_die_with_parent if die_with_parent and sys.platform == "linux" else None,
        )


def _listening(pid: int, address: str, port: int) -> bool | None:
    """Whether process `pid` holds a TCP socket listening on address:port (None: cannot tell).

    Read from /proc rather than by connecting: every probe connection makes sshd fork a
    connection handler, and one that hangs up during key exchange leaves an orphaned zombie."""
    try:
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    want = f"{struct.unpack('=I', socket.inet_aton(address))[0]:08X}:{port:04X}"
    inodes = {f[9] for f in map(str.split, table) if len(f) > 9 and f[1] == want and f[3] == "0A"}
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


def _ready(host: TestHost, proc: subprocess.Popen) -> bool:
    """sshd writes its pidfile once it listens; then the port must be held by that sshd."""
    try:
        if int((host.root / "sshd.pid").read_text().strip() or 0) != proc.pid:
            return False
    except (OSError, ValueError):
        return False
    listening = _listening(proc.pid, host.address, host.port)
    if listening is not None:
        return listening
    try:  # no /proc/net: connect (and say hello: a silent hang-up is logged as an error)
        with socket.create_connection((host.address, host.port), timeout=1) as s:
            s.settimeout(2)
            s.sendall(b"SSH-2.0-testhosts_probe\r\n")
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def _start_all(hosts: list[TestHost], marker: str, die_with_parent: bool) -> None:
    attempts = dict.fromkeys((h.alias for h in hosts), 0)
    pending = {h.alias: h for h in hosts}
    for h in hosts:
        h.proc = _spawn_sshd(h, marker, die_with_parent)
        h.sshd_pid = h.proc.pid
    deadline = time.monotonic() + START_TIMEOUT_S
    while pending:
        for alias, h in list(pending.items()):
            assert h.proc is not None
            if h.proc.poll() is not None:
                log = h.log.read_text(errors="replace")
                if "Address already in use" in log and attempts[alias] < 5:  # lost the port race
                    attempts[alias] += 1
                    h.proc = _spawn_sshd(h, marker, die_with_parent)
                    h.sshd_pid = h.proc.pid
                    continue
                raise RuntimeError(
                    f"sshd for test host {alias} exited with {h.proc.returncode}; log {h.log}:\n{log}"
                )
            if _ready(h, h.proc):
                del pending[alias]
        if pending and time.monotonic() > deadline:
            logs = "\n".join(
                f"--- {a} ({h.log}):\n{h.log.read_text(errors='replace')}" for a, h in pending.items()
            )
            raise RuntimeError(f"sshd did not accept connections within {START_TIMEOUT_S}s:\n{logs}")
        if pending:
            time.sleep(0.02)


def _write_client_files(th: TestHosts) -> None:
    blocks = []
    known = []
    for h in th.hosts.values():
        blocks.append(f"""\
Host {h.alias}
    HostName {h.address}
    Port {h.port}
    User root
    IdentityFile {_q(h.client_key)}
    IdentitiesOnly yes
    UserKnownHostsFile {_q(th.known_hosts)}
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 5
""")
        known.append(f"{h.known_hosts_name} {h.host_pubkey}\n")
    # Defaults for anything else (first obtained value wins, so this comes last): never consult
    # the system known hosts, an agent, or prompt.
    blocks.append(f"""\
Host *
    UserKnownHostsFile {_q(th.known_hosts)}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    UpdateHostKeys no
    CheckHostIP no
    HashKnownHosts no
    BatchMode yes
    IdentitiesOnly yes
    IdentityAgent none
    ConnectTimeout 5
    LogLevel ERROR
""")
    config = "# generated by tests/sshhosts.py\n" + "\n".join(blocks)
    th.ssh_config.write_text(config)
    th.known_hosts.write_text("".join(known))
    dot_ssh = th.dir / "home" / ".ssh"
    dot_ssh.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, text in (("config", config), ("known_hosts", "".join(known))):
        p = dot_ssh / name
        p.write_text(text)
        p.chmod(0o600)
    for p in (th.ssh_config, th.known_hosts):
        p.chmod(0o600)
    bindir = th.dir / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "ssh"
    wrapper.write_text(f"""\
#!/bin/sh
# OpenSSH reads ~/.ssh from the passwd entry, not $HOME: always use the test hosts' config
# (a later -F given by the caller still wins).
exec {SSH} -F {shlex.quote(str(th.ssh_config))} "$@"
""")
    wrapper.chmod(0o755)


def _write_state(th: TestHosts) -> None:
    state = {
        "marker": th.marker,
        "owner_pid": os.getpid(),
        "ssh_config": str(th.ssh_config),
        "hosts": {
            a: {
                "pid": h.sshd_pid,
                "address": h.address,
                "port": h.port,
                "bsd": h.bsd,
                "config": str(h.sshd_config),
                "client_key": str(h.client_key),
                "home": str(h.home),
                "adapter_dir": str(h.adapter_dir),
            }
            for a, h in th.hosts.items()
        },
    }
    tmp = th.dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, th.dir / STATE_FILE)


# --------------------------------------------------------------------------------------------
# BSD userland emulation

_BSD_PRELUDE = """\
#!/bin/sh
# BSD (macOS) userland emulation for a test host (tests/sshhosts.py): accepts the macOS
# options of {prog}, rejects GNU-only ones, then runs the real tool.
prog={prog}
illegal() {{
    echo "$prog: illegal option -- $1 (BSD userland)" >&2
    echo "usage: $prog {usage}" >&2
    exit 1
}}
not_emulated() {{
    echo "$prog: -$1 is a BSD option this test host does not emulate" >&2
    exit 1
}}
# rebuild "$@" as: options given in $opts (already quoted), "--", operands (BSD getopt stops at
# the first operand; GNU would go on parsing options after it)
q() {{ printf "'%s'" "$(printf '%s' "$1" | /usr/bin/sed "s/'/'\\\\\\\\''/g")"; }}
opts=""
"""

_BSD_WRAPPERS = {
    # BSD mv: -f -i -n -v, and -h (do not follow a target symlink to a dir) = GNU -T
    "mv": (
        "/usr/bin/mv",
        "[-f | -i | -n] [-hv] source target",
        ":fhinv",
        """\
        h) opts="$opts -T" ;;
        [finv]) opts="$opts -$o" ;;""",
    ),
    # BSD cp: no -T/-t/-u/-b/-d/--*; -c (clone), -X (no xattrs), -S (sparse) have no GNU twin
    "cp": (
        "/usr/bin/cp",
        "[-R [-H | -L | -P]] [-fi | -n] [-aclpSsvXx] source_file target_file",
        ":RHLPfinaclpSsvXxr",
        """\
        [cSX]) ;;
        [RHLPfinalpsvxr]) opts="$opts -$o" ;;""",
    ),
    # BSD ln: -h = GNU -n (no-dereference); -F, -T, -t, -r, -b are not BSD/not emulated
    "ln": (
        "/usr/bin/ln",
        "[-s [-F] | -L | -P] [-f | -i] [-hnv] source_file [target_file]",
        ":FLPfhinsvw",
        """\
        [hn]) opts="$opts -n" ;;
        w) ;;
        F) not_emulated F ;;
        [LPfisv]) opts="$opts -$o" ;;""",
    ),
    # macOS <= 12.2 readlink has only -n (no -f/-e/-m)
    "readlink": (
        "/usr/bin/readlink",
        "[-n] [file ...]",
        ":n",
        """\
        n) opts="$opts -n" ;;""",
    ),
    # BSD stat: -f FORMAT (translated for common specifiers), -L; no -c/--format/--printf
    "stat": (
        "/usr/bin/stat",
        "[-FLnq] [-f format | -l | -r | -s | -x] [-t timefmt] [file ...]",
        ":f:LnFlqrsxt:",
        """\
        f) fmt=$(bsd_format "$OPTARG") || exit 1 ;;
        L) opts="$opts -L" ;;
        n) nonl=1 ;;
        [Flqrsxt]) not_emulated "$o" ;;""",
    ),
    # BSD sed: -i/-I require a suffix argument (may be ''), no --*, no -z/-s GNU extras
    "sed": (
        "/usr/bin/sed",
        "[-Ealnru] [-e command] [-f command_file] [-i extension] [file ...]",
        ":Eae:f:i:I:lnru",
        """\
        [iI]) case $OPTARG in
                  */*|*\\ *|*\\;*|*\\'*)
                      echo "sed: -$o needs a backup suffix argument" \\
                           "(BSD userland: use -$o '' or -$o .bak)" >&2
                      exit 1 ;;
              esac
              opts="$opts $(q "-i$OPTARG")" ;;
        [ef]) opts="$opts -$o $(q "$OPTARG")" ;;
        [Elnr]) opts="$opts -$o" ;;
        u) opts="$opts -u" ;;
        a) ;;""",
    ),
}

_STAT_FORMAT = r"""
bsd_format() {
    # translate the common BSD stat -f specifiers to GNU stat -c ones
    out="" rest="$1"
    while [ -n "$rest" ]; do
        case $rest in
            %z*) out="$out%s" rest=${rest#%z} ;;
            %m*) out="$out%Y" rest=${rest#%m} ;;
            %a*) out="$out%X" rest=${rest#%a} ;;
            %c*) out="$out%Z" rest=${rest#%c} ;;
            %N*) out="$out%n" rest=${rest#%N} ;;
            %Y*) out="$out%N" rest=${rest#%Y} ;;
            %Lp*) out="$out%a" rest=${rest#%Lp} ;;
            %u*) out="$out%u" rest=${rest#%u} ;;
            %g*) out="$out%g" rest=${rest#%g} ;;
            %Su*) out="$out%U" rest=${rest#%Su} ;;
            %Sg*) out="$out%G" rest=${rest#%Sg} ;;
            %i*) out="$out%i" rest=${rest#%i} ;;
            %l*) out="$out%h" rest=${rest#%l} ;;
            %%*) out="$out%%" rest=${rest#%%} ;;
            %*) echo "stat: format ${rest%"${rest#??}"} is not emulated on this test host" >&2; return 1 ;;
            *) c=${rest%"${rest#?}"}; out="$out$c" rest=${rest#?} ;;
        esac
    done
    printf '%s' "$out"
}
"""

_STAT_POST = """\
if [ -n "${fmt+x}" ]; then
    if [ -n "${nonl-}" ]; then opts="$opts $(q "--printf=$fmt")"; else opts="$opts -c $(q "$fmt")"; fi
fi
"""

_BSD_TAIL = """\
while getopts "{optstring}" o; do
    case $o in
{cases}
        :) echo "$prog: option requires an argument -- $OPTARG" >&2
           echo "usage: $prog {usage}" >&2; exit 1 ;;
        *) illegal "$OPTARG" ;;
    esac
done
{post}shift $((OPTIND - 1))
eval "set -- $opts -- \\"\\$@\\""
exec {real} "$@"
"""

_UNAME = """\
#!/bin/sh
# macOS uname for a test host (tests/sshhosts.py): an Apple-silicon Mac.
[ $# -eq 0 ] && set -- -s
out=""
add() { out="${out:+$out }$1"; }
for a in "$@"; do
    case $a in
        -a) add Darwin; add "$(/usr/bin/uname -n)"; add 23.6.0
            add "Darwin Kernel Version 23.6.0: testhosts; root:xnu/RELEASE_ARM64_T6000"; add arm64 ;;
        -*)
            flags=${a#-}
            while [ -n "$flags" ]; do
                f=${flags%"${flags#?}"}; flags=${flags#?}
                case $f in
                    s) add Darwin ;; n) add "$(/usr/bin/uname -n)" ;; r) add 23.6.0 ;;
                    v) add "Darwin Kernel Version 23.6.0: testhosts; root:xnu/RELEASE_ARM64_T6000" ;;
                    m) add arm64 ;; p) add arm ;;
                    *) echo "uname: illegal option -- $f (BSD userland)" >&2
                       echo "usage: uname [-amnoprsv]" >&2; exit 1 ;;
                esac
            done ;;
        *) echo "usage: uname [-amnoprsv]" >&2; exit 1 ;;
    esac
done
echo "$out"
"""


def _make_bsdbin(bindir: Path) -> None:
    if bindir.exists():
        shutil.rmtree(bindir)
    bindir.mkdir()
    for tool in BSD_TOOLS:
        real = shutil.which(tool, path=LINUX_PATH)
        if real:
            (bindir / tool).symlink_to(real)
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else shutil.which("python3")
    if not python:
        raise RuntimeError("no python3 for the BSD-like host")
    (bindir / "python3").symlink_to(python)
    for prog, (real, usage, optstring, cases) in _BSD_WRAPPERS.items():
        text = _BSD_PRELUDE.format(prog=prog, usage=usage)
        post = ""
        if prog == "stat":
            text += _STAT_FORMAT
            post = _STAT_POST
        text += _BSD_TAIL.format(optstring=optstring, cases=cases, usage=usage, real=real, post=post)
        (bindir / prog).write_text(text)
        (bindir / prog).chmod(0o755)
    (bindir / "uname").write_text(_UNAME)
    (bindir / "uname").chmod(0o755)


# --------------------------------------------------------------------------------------------
# stopping


def _proc_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _ppid(pid: int) -> int:
    stat = _read(f"/proc/{pid}/stat")
    try:
        return int(stat[stat.rindex(b")") + 2 :].split()[1])
    except (ValueError, IndexError):
        return -1


def _is_ours(pid: int, marker: str, configs: list[str]) -> bool:
    """A process is ours if its environment has our marker or its cmdline names our sshd_config."""
    if pid == os.getpid():
        return False
    if marker and f"{MARKER_VAR}={marker}".encode() in _read(f"/proc/{pid}/environ").split(b"\0"):
        return True
    cmdline = _read(f"/proc/{pid}/cmdline")
    return any(c.encode() in cmdline for c in configs)


def find_processes(marker: str, configs: list[str], roots: list[int] = ()) -> set[int]:
    """PIDs of live processes belonging to a host set: marked ones, and descendants of `roots`
    that are ours (sshd connection handlers rewrite their cmdline but keep sshd's environment)."""
    pids = _proc_pids()
    ours = {p for p in pids if _is_ours(p, marker, configs)}
    children: dict[int, list[int]] = {}
    for p in pids:
        children.setdefault(_ppid(p), []).append(p)
    stack = [r for r in roots if r in ours]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in ours and c != os.getpid():
                ours.add(c)
                stack.append(c)
    return {p for p in ours if _alive(p)}


def _alive(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and not stat[stat.rindex(b")") + 2 :].startswith(b"Z")


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _stop(
    marker: str,
    listener_pids: list[int],
    configs: list[str],
    procs: list[subprocess.Popen] = (),
    timeout: float = 5.0,
) -> None:
    """End every process of a host set, each by PID: session processes leaves first, so each
    is reaped by its still-running parent (no orphaned zombies), the listeners last. SIGTERM;
    SIGKILL for whatever is still there after `timeout`."""
    listeners = {p for p in listener_pids if p > 0 and _is_ours(p, marker, configs)}
    deadline = time.monotonic() + timeout
    sent: dict[int, int] = {}
    while True:
        for proc in procs:  # reap our own children (the listeners)
            proc.poll()
        live = find_processes(marker, configs, list(listeners))
        todo = (live - listeners) or live
        if not todo:
            return
        parents = {_ppid(p) for p in todo}
        leaves = {p for p in todo if p not in parents} or todo
        now = time.monotonic()
        if now > deadline + 2:
            raise RuntimeError(f"test host processes survived SIGKILL: {sorted(live)}")
        sig = signal.SIGKILL if now > deadline else signal.SIGTERM
        for pid in leaves:
            if sent.get(pid) != sig:
                _signal(pid, sig)
                sent[pid] = sig
        # wait (briefly) until the leaves are gone, or are zombies nobody of ours will reap
        until = time.monotonic() + 0.5
        while time.monotonic() < until and any(
            _alive(p) or (os.path.exists(f"/proc/{p}") and _ppid(p) in live) for p in leaves
        ):
            for proc in procs:
                proc.poll()
            time.sleep(0.005)


def stop_dir(dir: Path) -> int:
    """Stop the hosts a (possibly detached or dead) `start_hosts` left in `dir`. Returns how many
    processes were still running."""
    state_path = Path(dir) / STATE_FILE
    state = json.loads(state_path.read_text())
    configs = [h["config"] for h in state["hosts"].values()]
    listeners = [h["pid"] for h in state["hosts"].values()]
    found = find_processes(state["marker"], configs, listeners)
    _stop(state["marker"], listeners, configs)
    state_path.unlink(missing_ok=True)
    return len(found)


# --------------------------------------------------------------------------------------------
# who is connected to whom, and a network that can be cut

_TCP_ESTABLISHED = "01"


def _tcp_address(field: str) -> tuple[str, int]:
    addr, port = field.split(":")
    return socket.inet_ntoa(struct.pack("=I", int(addr, 16))), int(port, 16)


def _tcp_sockets() -> list[tuple[tuple[str, int], tuple[str, int], str, str]]:
    """(local address, remote address, state, inode) of this machine's IPv4 TCP sockets."""
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) > 9:
            rows.append((_tcp_address(f[1]), _tcp_address(f[2]), f[3], f[9]))
    return rows


def _socket_owners(inodes: set[str]) -> set[int]:
    """PIDs with an open file descriptor on one of the sockets `inodes`."""
    wanted = {f"socket:[{i}]" for i in inodes}
    owners = set()
    for pid in _proc_pids():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                        owners.add(pid)
                        break
    return owners


def tcp_clients(address: str, port: int) -> set[int]:
    """PIDs holding the client end of an established TCP connection to address:port."""
    inodes = {
        inode
        for _local, remote, state, inode in _tcp_sockets()
        if remote == (address, port) and state == _TCP_ESTABLISHED
    }
    return _socket_owners(inodes)


def descendants(pid: int) -> set[int]:
    """Live processes under `pid` (not `pid` itself)."""
    children: dict[int, list[int]] = {}
    for p in _proc_pids():
        children.setdefault(_ppid(p), []).append(p)
    found, stack = set(), [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in found:
                found.add(c)
                stack.append(c)
    return {p for p in found if _alive(p)}


class TcpRelay:
    """A TCP relay from `address` (loopback) to `target`: the network between a client and a host.

    `cut()` drops every connection through it at once, as a dropped link does (both ends see the
    connection end); `cut_after(n)` does so once n more bytes went from clients to the target.
    New connections still pass afterwards, as when the network comes back.
    """

    def __init__(self, address: str, target: tuple[str, int]):
        self.target = target
        self._listener = socket.create_server((address, 0))
        self.address, self.port = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._budget: int | None = None  # bytes upstream until the next cut
        self.cuts = 0  # connections dropped so far
        self._closed = False
        self._start(self._accept)

    def _start(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._pairs.append((client, upstream))
            self._start(self._pump, client, upstream, True)
            self._start(self._pump, upstream, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    break
                if upstream and self._spend(len(data)):
                    return
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):  # one side ended: end the other
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _spend(self, n: int) -> bool:
        with self._lock:
            if self._budget is None:
                return False
            self._budget -= n
            if self._budget > 0:
                return False
            self._budget = None
        self.cut()
        return True

    def cut_after(self, nbytes: int) -> None:
        """Drop every connection once `nbytes` more bytes went from clients to the target."""
        with self._lock:
            self._budget = nbytes

    def cut(self) -> int:
        """Drop every connection through the relay now; returns how many."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self.cuts += len(pairs)
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RDWR)  # wakes the pumps; they close nothing themselves
        for pair in pairs:
            for s in pair:
                s.close()
        return len(pairs)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.cut()
        for t in self._threads:
            t.join(timeout=10)

    def __enter__(self) -> TcpRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
