"""The SSH test hosts themselves (tests/sshhosts.py): real sshd, real ssh/rsync/paramiko, no mocks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import paramiko
import pytest
import sshhosts
from sshhosts import TestHosts

SPECS = [("mac-1", True), ("linux-1", False), ("linux-2", False)]
ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.heavy,  # starts sshd hosts and runs ssh, rsync and the hosts script
    pytest.mark.skipif(
        not (os.geteuid() == 0 and os.access(sshhosts.SSHD, os.X_OK)), reason="needs root and /usr/sbin/sshd"
    ),
]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    yield from sshhosts.hosts_fixture_factory(tmp_path_factory, SPECS)


def ssh(hosts: TestHosts, alias: str, command: str, *opts: str, timeout: float = 30):
    return subprocess.run(
        ["ssh", "-F", str(hosts.ssh_config), *opts, alias, command],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def ours_alive(marker: str, configs: list[str]) -> set[int]:
    """Live processes whose cmdline names one of `configs` or whose environment has `marker`."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except (OSError, IndexError):
            continue
        if any(c.encode() in cmdline for c in configs) or f"TESTHOSTS_ID={marker}".encode() in environ:
            found.add(int(name))
    return found


def test_layout(hosts):
    assert list(hosts.hosts) == ["mac-1", "linux-1", "linux-2"]
    addresses = {h.address for h in hosts.hosts.values()}
    assert addresses == {"127.0.0.10", "127.0.0.11", "127.0.0.12"}
    for h in hosts.hosts.values():
        assert h.root.is_dir() and h.home.is_dir() and not h.adapter_dir.exists()
        assert h.adapter_dir == h.root / "adapters"
        assert h.host_pubkey.startswith("ssh-ed25519 AAAA")
        assert (h.root / "authorized_keys").read_text() == Path(f"{h.client_key}.pub").read_text()
        assert f"[{h.address}]:{h.port} {h.host_pubkey}" in hosts.known_hosts.read_text().splitlines()
    home_ssh = hosts.dir / "home" / ".ssh"
    assert (home_ssh / "config").read_text() == hosts.ssh_config.read_text()
    assert (home_ssh / "known_hosts").read_text() == hosts.known_hosts.read_text()
    assert (home_ssh / "config").stat().st_mode & 0o777 == 0o600


def test_each_host_has_its_own_home_as_home_and_cwd(hosts):
    for alias, h in hosts.hosts.items():
        r = ssh(hosts, alias, 'echo "$HOME"; pwd; echo "$TESTHOSTS_ALIAS"')
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [str(h.home), str(h.home), alias]


def test_env_never_needs_the_real_dot_ssh(hosts):
    """With env(), plain `ssh alias` and `rsync` with the default remote shell reach the hosts."""
    env = hosts.env()
    assert env["HOME"] == str(hosts.dir / "home") and "SSH_AUTH_SOCK" not in env
    r = subprocess.run(["ssh", "linux-2", "echo $HOME"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(hosts["linux-2"].home)
    r = subprocess.run(["ssh", "-G", "mac-1"], env=env, capture_output=True, text=True, timeout=30)
    assert f"userknownhostsfile {hosts.known_hosts}" in r.stdout
    assert f"hostname {hosts['mac-1'].address}" in r.stdout


def test_a_host_refuses_another_hosts_client_key(hosts):
    # Without the generated config: IdentityFile accumulates, so `-o IdentityFile=` on top of
    # the config would offer the host's own key as well.
    aliases = list(hosts.hosts)
    for alias, other in [*zip(aliases, aliases[1:] + aliases[:1], strict=True), (aliases[0], aliases[0])]:
        h = hosts[alias]
        r = subprocess.run(
            [
                "ssh",
                "-F",
                "none",
                "-p",
                str(h.port),
                "-o",
                f"UserKnownHostsFile={hosts.known_hosts}",
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                f"IdentityFile={hosts[other].client_key}",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "IdentityAgent=none",
                f"root@{h.address}",
                "true",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        if other == alias:  # the control: its own key works this way
            assert r.returncode == 0, r.stderr
        else:
            assert r.returncode == 255
            assert "Permission denied (publickey)" in r.stderr


def test_a_changed_host_key_is_refused(hosts, tmp_path):
    h = hosts["linux-1"]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{h.known_hosts_name} {hosts['linux-2'].host_pubkey}\n")
    r = ssh(hosts, "linux-1", "true", "-o", f"UserKnownHostsFile={wrong}")
    assert r.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in r.stderr or "Host key verification failed" in r.stderr


def test_an_unknown_host_is_refused(hosts, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    r = ssh(hosts, "mac-1", "true", "-o", f"UserKnownHostsFile={empty}", "-o", "StrictHostKeyChecking=yes")
    assert r.returncode == 255
    assert "Host key verification failed" in r.stderr
    assert empty.read_text() == ""


def test_rsync_over_ssh_to_each_host(hosts, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(100_000))
    (src / "sub" / "b.txt").write_text("héllo\n")
    for alias, h in hosts.hosts.items():
        r = subprocess.run(
            ["rsync", "-a", "-e", f"ssh -F {hosts.ssh_config}", f"{src}/", f"{alias}:dest/"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert (h.home / "dest" / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
        assert (h.home / "dest" / "sub" / "b.txt").read_text() == "héllo\n"
    # default remote shell through env(): the PATH wrapper supplies the config
    r = subprocess.run(
        ["rsync", "-a", f"{src}/", f"mac-1:{hosts['mac-1'].adapter_dir}/"],
        env=hosts.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert (hosts["mac-1"].adapter_dir / "sub" / "b.txt").is_file()


def test_proxyjump_through_another_host(hosts):
    r = ssh(hosts, "linux-1", 'echo "$HOME"', "-J", "mac-1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(hosts["linux-1"].home)


def test_bsd_like_host_has_a_mac_userland(hosts):
    target = hosts["mac-1"].home / "hashme"
    target.write_bytes(b"adapter bytes\n")
    digest = hashlib.sha256(b"adapter bytes\n").hexdigest()
    checks = {
        "command -v sha256sum": (1, 127),
        "command -v md5sum || command -v sha1sum || command -v b2sum": (1, 127),
        "shasum -a 256 hashme": (0,),
        "uname; uname -s": (0,),
        "python3 -c 'print(1)'": (0,),
        "mv -T a b": (1,),
        "mv --force a b": (1,),
        "readlink -f /": (1,),
        "readlink -e /": (1,),
        "stat -c %s hashme": (1,),
        "cp -T a b": (1,),
        "ln -T a b": (1,),
        "sed -i 's/a/b/' hashme": (1,),
        "sed --version": (1,),
    }
    out = {}
    for command, codes in checks.items():
        r = ssh(hosts, "mac-1", command)
        assert r.returncode in codes, (command, r.returncode, r.stdout, r.stderr)
        out[command] = r
    assert out["shasum -a 256 hashme"].stdout.split()[0] == digest
    assert out["uname; uname -s"].stdout.split() == ["Darwin", "Darwin"]
    assert out["python3 -c 'print(1)'"].stdout == "1\n"
    assert "mv: illegal option -- T (BSD userland)" in out["mv -T a b"].stderr
    assert "readlink: illegal option -- f (BSD userland)" in out["readlink -f /"].stderr
    assert "stat: illegal option -- c (BSD userland)" in out["stat -c %s hashme"].stderr
    assert "BSD userland" in out["sed -i 's/a/b/' hashme"].stderr
    assert target.read_bytes() == b"adapter bytes\n"  # the rejected sed -i changed nothing


def test_bsd_like_host_accepts_the_bsd_forms(hosts):
    script = """set -e
mkdir -p w && cd w && rm -rf ./*
printf 'abc\\n' > f
sed -i '' 's/a/x/' f && sed -i.bak 's/b/y/' f && cat f f.bak
stat -f '%z' f
mkdir d1 d2 && ln -s d1 cur && ln -sfh d2 cur && readlink cur
ln -s d1 tmp && mv -h tmp cur && readlink cur
cp -Rp d1 d3 && ls -d d3
echo ok
"""
    r = ssh(hosts, "mac-1", script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["xyc", "xbc", "4", "d2", "d1", "d3", "ok"]


def test_linux_hosts_keep_the_gnu_userland(hosts):
    r = ssh(hosts, "linux-2", "command -v sha256sum && uname -s && mv --version >/dev/null && echo $PATH")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["/usr/bin/sha256sum", "Linux", sshhosts.LINUX_PATH]


def test_paramiko_with_reject_policy(hosts):
    for alias in ("mac-1", "linux-1"):
        h = hosts[alias]
        assert paramiko.HostKeys(str(hosts.known_hosts)).lookup(h.known_hosts_name) is not None
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.load_host_keys(str(hosts.known_hosts))
        client.connect(
            h.address,
            port=h.port,
            username="root",
            key_filename=str(h.client_key),
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
        )
        try:
            _, stdout, _ = client.exec_command('python3 -c "print(1)"', timeout=20)
            assert stdout.read() == b"1\n"
            assert stdout.channel.recv_exit_status() == 0
            with client.open_sftp() as sftp:
                assert sftp.normalize(".") == str(h.home)
                with sftp.open("sftp-file", "w") as f:
                    f.write(b"x")
                sftp.posix_rename("sftp-file", "sftp-renamed")
            assert (h.home / "sftp-renamed").read_bytes() == b"x"
        finally:
            client.close()
    # and an unknown host is rejected
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    h = hosts["linux-2"]
    with pytest.raises(paramiko.SSHException):
        client.connect(
            h.address,
            port=h.port,
            username="root",
            key_filename=str(h.client_key),
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
        )
    client.close()


def test_stop_leaves_no_process_behind(tmp_path):
    hosts = sshhosts.start_hosts(tmp_path / "h", [("solo", True), ("duo", False)])
    configs = [str(h.sshd_config) for h in hosts.hosts.values()]
    try:
        # a session still connected, and a process a "deploy" left running on the host
        r = ssh(hosts, "duo", "nohup sleep 300 >/dev/null 2>&1 & echo $!")
        assert r.returncode == 0, r.stderr
        leftover = int(r.stdout)
        h = hosts["solo"]
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.load_host_keys(str(hosts.known_hosts))
        client.connect(
            h.address,
            port=h.port,
            username="root",
            key_filename=str(h.client_key),
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
        )
        client.exec_command("exec sleep 299")
        deadline = time.monotonic() + 10
        while not any(
            b"sleep\x00299" in Path(f"/proc/{p}/cmdline").read_bytes()
            for p in ours_alive(hosts.marker, configs)
        ):
            assert time.monotonic() < deadline, "the paramiko session's command did not start"
            time.sleep(0.02)
        assert leftover in ours_alive(hosts.marker, configs)
        assert {h.sshd_pid for h in hosts.hosts.values()} <= ours_alive(hosts.marker, configs)
    finally:
        hosts.stop()
    client.close()
    assert ours_alive(hosts.marker, configs) == set()
    assert not (hosts.dir / sshhosts.STATE_FILE).exists()


def test_script_start_detached_and_stop(tmp_path):
    script = ROOT / "scripts" / "test-hosts"
    d = tmp_path / "hosts dir"
    r = subprocess.run(
        [sys.executable, str(script), "start", str(d), "--detach", "--hosts", "m:bsd,l"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert f"ssh -F {d}/ssh_config m true" in r.stdout
    state = json.loads((d / "pids.json").read_text())
    configs = [h["config"] for h in state["hosts"].values()]
    try:
        r = subprocess.run(
            ["ssh", "-F", str(d / "ssh_config"), "m", "uname"], capture_output=True, text=True, timeout=30
        )
        assert (r.returncode, r.stdout) == (0, "Darwin\n"), r.stderr
    finally:
        r = subprocess.run(
            [sys.executable, str(script), "stop", str(d)], capture_output=True, text=True, timeout=60
        )
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 5
    while ours_alive(state["marker"], configs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ours_alive(state["marker"], configs) == set()
