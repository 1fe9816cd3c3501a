"""SSHTransport: an endpoint reached over SSH, configured by the user's ~/.ssh/config.

Two channels, one host-key policy:
- endpoint operations run through one paramiko connection per endpoint (reused for the run):
  the remote `python3` executes `endpoint_ops` sent over stdin, so nothing is installed there;
- rsync and spawned programs use the system OpenSSH client with a ControlMaster socket, the
  same ssh_config and the same known_hosts files.
Unknown host keys are refused on both (paramiko RejectPolicy, `StrictHostKeyChecking=yes`)
unless the user passes --accept-new-host-keys; a changed key is always refused.

A lost connection is reported as such (which endpoint, which host, "rerun to resume"), never as a
paramiko traceback; the next call on the transport connects again. `ProxyJump a,b` is followed
hop by hop, as OpenSSH does. ControlMaster sockets live in `<tmp>/adctl-<pid>-<random>`, so
`stale_control_dirs()` can tell those of dead runs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterctl import endpoint_ops
from adapterctl.errors import TransportError, UsageError
from adapterctl.transports.base import CommandResult, ProgressFn, SyncResult, Transport

# The remote agent: reads endpoint_ops' source once (first line, JSON), then answers one JSON
# request per line until stdin closes. One per endpoint per run: ~1 ms an op instead of a new
# exec + python3 start + 25 KB of source for each.
_AGENT = (
    "import json,sys\n"
    "g={'__name__':'adapterctl_endpoint_ops'}\n"
    "exec(compile(json.loads(sys.stdin.readline()),'adapterctl_endpoint_ops.py','exec'),g)\n"
    "for line in iter(sys.stdin.readline,''):\n"
    " sys.stdout.write(g['handle'](line)+'\\n');sys.stdout.flush()\n"
)
_OPS_SOURCE = Path(endpoint_ops.__file__).read_text(encoding="utf-8")
_BYTES_SENT = re.compile(r"Total bytes sent:\s*([\d,.]+)")


@dataclass(frozen=True)
class SSHOptions:
    """How to reach SSH endpoints; one instance for the whole run."""

    ssh_config: Path | None = None  # --ssh-config; default ~/.ssh/config
    accept_new_host_keys: bool = False
    connect_timeout: float = 10.0
    # dead-link detection: TCP keepalive and SSH keepalives every `keepalive_s` of silence, given
    # up after `keepalive_count` unanswered probes (paramiko sockets; ServerAlive* for OpenSSH)
    keepalive_s: int = 15
    keepalive_count: int = 4


@dataclass(frozen=True)
class HostSpec:
    """An ssh_config alias resolved the way OpenSSH would resolve it (the parts we use)."""

    alias: str
    hostname: str
    port: int
    user: str | None
    identity_files: tuple[str, ...]
    identities_only: bool
    known_hosts: tuple[str, ...]
    proxy_jump: str | None
    config_path: Path | None

    @property
    def key_name(self) -> str:
        """How known_hosts names this host ("[host]:port" for ports other than 22)."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def _config_path(options: SSHOptions) -> Path | None:
    if options.ssh_config is not None:
        if not options.ssh_config.is_file():
            raise UsageError(f"--ssh-config {options.ssh_config} does not exist")
        return options.ssh_config
    default = Path(os.path.expanduser("~/.ssh/config"))
    return default if default.is_file() else None


def resolve_host(
    alias: str, options: SSHOptions, user: str | None = None, port: int | None = None
) -> HostSpec:
    """Look `alias` up in the ssh_config; explicit endpoint `user`/`port` win, as `-l`/`-p` do."""
    import paramiko

    path = _config_path(options)
    conf: dict[str, Any] = {}
    if path is not None:
        try:
            conf = paramiko.SSHConfig.from_path(str(path)).lookup(alias)
        except Exception as exc:  # paramiko raises several types for a bad config
            raise UsageError(f"ssh config {path} does not parse: {exc}") from None
    known = conf.get("userknownhostsfile")
    known_files = (
        tuple(os.path.expanduser(k) for k in known.split())
        if known
        else (os.path.expanduser("~/.ssh/known_hosts"), os.path.expanduser("~/.ssh/known_hosts2"))
    )
    jump = conf.get("proxyjump")
    return HostSpec(
        alias=alias,
        hostname=conf.get("hostname", alias),
        port=int(port or conf.get("port", 22)),
        user=user or conf.get("user"),
        identity_files=tuple(os.path.expanduser(f) for f in conf.get("identityfile", [])),
        identities_only=str(conf.get("identitiesonly", "no")).lower() == "yes",
        known_hosts=known_files,
        proxy_jump=None if not jump or jump.lower() == "none" else jump,
        config_path=path,
    )


def fingerprint(key) -> str:
    """OpenSSH-style SHA256 fingerprint of a paramiko key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _parse_hop(hop: str) -> tuple[str | None, str, int | None]:
    """One ProxyJump entry, `[user@]host[:port]` or `ssh://[user@]host[:port]`."""
    text = hop.strip().removeprefix("ssh://").rstrip("/")
    user, _, rest = text.rpartition("@")
    if rest.startswith("["):  # [IPv6 address]:port
        host, _, port = rest[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = rest.partition(":")
    if not host or (port and not port.isdigit()):
        raise UsageError(f"bad ProxyJump entry {hop!r}: expected [user@]host[:port]")
    return user or None, host, int(port) if port else None


class _HostKeyPolicy:
    """Refuse unknown keys (with the fingerprint and the fix), or accept and record them."""

    def __init__(self, endpoint: str, spec: HostSpec, accept_new: bool, what: str = ""):
        self.endpoint, self.spec, self.accept_new = endpoint, spec, accept_new
        self.what = what  # "jump host X " for a ProxyJump hop

    def missing_host_key(self, client, hostname, key) -> None:
        if not self.accept_new:
            raise TransportError(
                f"endpoint {self.endpoint}: host key of {self.what}{hostname} is unknown "
                f"({key.get_name()} {fingerprint(key)}; not in {', '.join(self.spec.known_hosts)})",
                "check that fingerprint with the host's owner, then rerun with --accept-new-host-keys "
                "(it is added to your known_hosts); nothing was changed",
            )
        target = self.spec.known_hosts[0]
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def ssh_command(spec: HostSpec, options: SSHOptions, control_path: str | None) -> list[str]:
    """The OpenSSH client command line (without the host) with our host-key policy.

    It names the very ssh_config and known_hosts files paramiko resolved, so both channels trust
    the same keys (OpenSSH would otherwise read the passwd home's ~/.ssh, not $HOME's).
    """
    cmd = ["ssh"]
    if spec.config_path is not None:
        cmd += ["-F", str(spec.config_path)]
    known = " ".join(f'"{k}"' if " " in k else k for k in spec.known_hosts)
    cmd += [
        "-o",
        "BatchMode=yes",
        "-o",
        f"StrictHostKeyChecking={'accept-new' if options.accept_new_host_keys else 'yes'}",
        "-o",
        f"UserKnownHostsFile={known}",
        "-o",
        f"ConnectTimeout={int(options.connect_timeout)}",
        "-o",
        f"ServerAliveInterval={max(1, int(options.keepalive_s))}",
        "-o",
        f"ServerAliveCountMax={options.keepalive_count}",
    ]
    if control_path:
        # bounded: a master orphaned by a killed run goes away by itself
        cmd += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_path}", "-o", "ControlPersist=30"]
    if spec.user:
        cmd += ["-l", spec.user]
    cmd += ["-p", str(spec.port)]
    return cmd


# -- connections that notice a dead link --------------------------------------------------------------
_LOST_HINT = "check the network and that the host is up, then rerun the command: it resumes where it stopped"
_MAX_HOPS = 16  # ProxyJump hops on the way to one host (more is a loop in the ssh_config)


def _say(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "the connection was closed"
    return str(exc) or type(exc).__name__


def _open_socket(spec: HostSpec, options: SSHOptions) -> socket.socket:
    """A TCP connection to `spec` that notices a dead link: keepalive probes after `keepalive_s`
    of silence, and (Linux) a bound on how long sent data may stay unacknowledged."""
    sock = socket.create_connection((spec.hostname, spec.port), timeout=options.connect_timeout)
    interval = max(1, int(options.keepalive_s))
    unacked_ms = interval * (options.keepalive_count + 1) * 1000
    idle = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))  # macOS: TCP_KEEPALIVE
    settings = (
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, idle, interval),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), interval),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), options.keepalive_count),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), unacked_ms),
    )
    for level, name, value in settings:
        if name is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, name, value)
    return sock


def _link_down(client) -> str | None:
    """Why `client`'s connection is gone, or None while it is up.

    A channel's EOF alone does not tell: the remote program may just have exited. paramiko's
    transport thread records the EOF or socket error that ended it before it closes the channels,
    so a channel that ended with the connection always finds it here."""
    transport = client.get_transport() if client is not None else None
    if transport is None:
        return "not connected"
    exc = transport.saved_exception
    if isinstance(exc, EOFError | OSError):
        return _say(exc)
    return None if transport.is_active() else "the connection was closed"


# -- ControlMaster directories ------------------------------------------------------------------------
_CONTROL_PREFIX = "adctl-"  # short: a socket path has ~104 bytes at most
_CONTROL_DIR = re.compile(r"^adctl-(\d+)-[A-Za-z0-9_]+$")  # adctl-<owner pid>-<random>
_OLD_CONTROL_DIR = re.compile(r"^adctl-[A-Za-z0-9_]+$")  # older runs: no pid in the name
OLD_CONTROL_DIR_STALE_S = 3600.0
_swept_control_dirs = False  # remove_stale_control_dirs() ran in this process


def _started_at(pid: int) -> float | None:
    """When process `pid` started (epoch seconds) where /proc tells, else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(pid: int, dir_mtime: float) -> bool:
    """Whether the run that made a control dir may still be running: its pid is alive and, where
    /proc tells, started before the dir last changed (so the pid was not reused since)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    except (OverflowError, ValueError):
        return False
    started = _started_at(pid)
    return started is None or started <= dir_mtime + 2  # boot time in /proc/stat is whole seconds


def _tree_bytes(path: str) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def stale_control_dirs(root: Path | None = None) -> list[tuple[Path, int]]:
    """ControlMaster dirs that adapterctl runs which are gone left in the temp dir (or `root`):
    (path, bytes in it), this user's only. `adctl-<pid>-*` whose pid is dead (or now another
    process), and old-format `adctl-*` (no pid) unchanged for an hour."""
    root = Path(root) if root is not None else Path(tempfile.gettempdir())
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    now, found = time.time(), []
    for entry in entries:
        m = _CONTROL_DIR.match(entry.name)
        if not m and not _OLD_CONTROL_DIR.match(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        if m:
            stale = not _owner_alive(int(m.group(1)), st.st_mtime)
        else:
            stale = now - st.st_mtime > OLD_CONTROL_DIR_STALE_S
        if stale:
            found.append((Path(entry.path), _tree_bytes(entry.path)))
    return sorted(found)


def remove_stale_control_dirs(root: Path | None = None) -> list[tuple[Path, int]]:
    """Delete what `stale_control_dirs(root)` lists; returns the (path, bytes) removed."""
    removed = []
    for path, size in stale_control_dirs(root):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append((path, size))
    return removed


def _die_with_parent() -> None:
    """In the rsync child (Linux): die with adapterctl, so a killed run leaves no writer behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_PROGRESS = re.compile(rb"^\s*([\d,.]+)\s+\d+%")
# rsync's exit codes for a broken link (socket I/O, protocol stream, timeouts, ssh itself), and
# what rsync/ssh print when the connection under them went away
_RSYNC_LINK_CODES = (10, 12, 30, 35, 255)
_LINK_LOST = re.compile(
    r"connection unexpectedly closed|broken pipe|connection reset|connection to \S+ closed"
    r"|closed by remote host|not responding|timed out|unexpected end of file|read from master failed",
    re.IGNORECASE,
)


def _follow_progress(stream, progress: ProgressFn | None) -> str:
    """Read rsync's stdout: report `--info=progress2` byte counts as they grow; return the rest."""
    done, buf, text = 0, b"", []
    while chunk := stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536):
        buf += chunk
        *pieces, buf = re.split(rb"[\r\n]", buf)
        for piece in pieces:
            m = _PROGRESS.match(piece)
            if m:
                now = int(m.group(1).replace(b",", b"").replace(b".", b""))
                if progress and now > done:
                    progress(now - done)
                done = max(done, now)
            elif piece.strip():
                text.append(piece.decode(errors="replace"))
    text.append(buf.decode(errors="replace"))
    return "\n".join(text)


def _last_lines(text: str, n: int = 3) -> str:
    return " | ".join([ln for ln in text.strip().splitlines() if ln.strip()][-n:])


def _rsync_env() -> dict[str, str]:
    """rsync's environment: argument protection on, whatever the caller's environment says
    (RSYNC_OLD_ARGS=1 would hand our paths to the remote shell unescaped)."""
    env = {k: v for k, v in os.environ.items() if k != "RSYNC_OLD_ARGS"}
    env["RSYNC_PROTECT_ARGS"] = "1"
    return env


class SSHTransport(Transport):
    """Reach one endpoint over SSH. Connects lazily; `close()` ends every connection it made.

    No paramiko or socket exception leaves it: a failure is a TransportError naming the endpoint
    and host. After a lost connection the next call connects again."""

    def __init__(
        self, name: str, alias: str, options: SSHOptions, user: str | None = None, port: int | None = None
    ):
        self.options = options
        self.spec = resolve_host(alias, options, user, port)
        super().__init__(name, f"{self.spec.user + '@' if self.spec.user else ''}{alias}")
        self._client = None
        self._hops: list = []  # paramiko clients of the ProxyJump hosts, first hop first
        self._agent = None  # (channel, stdin, stdout) of the remote endpoint_ops agent
        self._lock = threading.RLock()  # _call_raw holds it while _connect takes it
        self._control_dir: str | None = None
        self._procs: list[subprocess.Popen] = []

    # -- connections ------------------------------------------------------------------------
    def _connect(self):
        """The paramiko client, logged in (through every ProxyJump hop); a new one if the last
        connection was lost."""
        with self._lock:
            if self._client is not None:
                if _link_down(self._client) is None:
                    return self._client
                self._drop_connection()
            route = self._route(self.spec)
            hops: list = []
            sock = None
            try:
                for hop, nxt in zip(route, [*route[1:], self.spec], strict=False):  # nxt: where hop leads
                    hops.append(self._login(hop, sock, jump=True))
                    sock = self._forward(hops[-1], hop, nxt)
                client = self._login(self.spec, sock)
            except BaseException:
                for c in reversed(hops):
                    c.close()
                raise
            self._client, self._hops = client, hops
            return client

    def _route(self, spec: HostSpec, depth: int = 0) -> list[HostSpec]:
        """The jump hosts on the way to `spec`, first hop first. As OpenSSH: `ProxyJump a,b` reaches
        b through a, and only the first hop's own ssh_config ProxyJump is followed further."""
        if not spec.proxy_jump:
            return []
        entries = map(_parse_hop, spec.proxy_jump.split(","))
        hops = [resolve_host(host, self.options, user, port) for user, host, port in entries]
        if depth + len(hops) > _MAX_HOPS:
            raise UsageError(
                f"endpoint {self.name}: ProxyJump for {spec.alias} goes through more than {_MAX_HOPS} "
                f"hosts (a loop in {spec.config_path or '~/.ssh/config'}?)"
            )
        return [*self._route(hops[0], depth + len(hops)), *hops]

    def _login(self, spec: HostSpec, sock, jump: bool = False):
        """A logged-in paramiko client for `spec`, over `sock` (a channel through the previous hop)
        or a new TCP connection; its host key checked against spec's own known_hosts."""
        import paramiko

        what = f"jump host {spec.alias}" if jump else self.where
        client = paramiko.SSHClient()
        for path in spec.known_hosts:
            if os.path.isfile(path):
                client.load_system_host_keys(path)
        client.set_missing_host_key_policy(
            _HostKeyPolicy(self.name, spec, self.options.accept_new_host_keys, f"{what} " if jump else "")
        )
        keys = [f for f in spec.identity_files if os.path.isfile(f)]
        try:
            if sock is None:
                sock = _open_socket(spec, self.options)
            client.connect(
                spec.hostname,
                port=spec.port,
                username=spec.user,
                key_filename=keys or None,
                look_for_keys=not spec.identities_only,
                allow_agent=bool(os.environ.get("SSH_AUTH_SOCK")),
                timeout=self.options.connect_timeout,
                banner_timeout=self.options.connect_timeout,
                auth_timeout=self.options.connect_timeout,
                sock=sock,
            )
            client.get_transport().set_keepalive(max(1, int(self.options.keepalive_s)))
            return client
        except paramiko.BadHostKeyException as exc:
            problem = TransportError(
                f"endpoint {self.name}: host key of {what} ({spec.key_name}) CHANGED: the host offered "
                f"{fingerprint(exc.key)}, known_hosts has {fingerprint(exc.expected_key)} — refusing "
                "(possible man-in-the-middle); nothing was changed",
                f"if the host was really reinstalled, remove the old key with "
                f"`ssh-keygen -R '{spec.key_name}' -f {spec.known_hosts[0]}` and reconnect",
            )
        except TransportError as exc:
            problem = exc
        except paramiko.AuthenticationException as exc:
            problem = TransportError(
                f"endpoint {self.name}: SSH login to {what} ({spec.key_name}) refused: {exc}",
                f"check User/IdentityFile for {spec.alias} in {spec.config_path or '~/.ssh/config'}; "
                f"`ssh {spec.alias} true` must work without a password",
            )
        except Exception as exc:  # OSError, EOFError, SSHException: never a traceback
            problem = TransportError(
                f"endpoint {self.name}: cannot connect to {what} ({spec.key_name}): {_say(exc)}",
                f"check the host is up and `ssh {spec.alias} true` works",
            )
        client.close()
        if sock is not None:
            with contextlib.suppress(Exception):
                sock.close()
        raise problem

    def _forward(self, client, hop: HostSpec, nxt: HostSpec):
        """A channel from jump host `hop` to the next host on the way (direct-tcpip, as `ssh -W`)."""
        try:
            return client.get_transport().open_channel(
                "direct-tcpip",
                (nxt.hostname, nxt.port),
                ("127.0.0.1", 0),
                timeout=self.options.connect_timeout,
            )
        except Exception as exc:  # ChannelException (refused), SSHException, EOFError
            raise TransportError(
                f"endpoint {self.name}: ProxyJump {self.spec.proxy_jump}: jump host {hop.alias} cannot "
                f"reach {nxt.hostname}:{nxt.port}: {_say(exc)}",
                f"check that `ssh {nxt.alias} true` works with the same ssh_config",
            ) from None

    def _drop_connection(self) -> None:
        """Forget the paramiko connection (and its hops); the next call connects again."""
        with self._lock:
            if self._agent is not None:
                self._close_agent()
            for client in (self._client, *reversed(self._hops)):
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()
            self._client, self._hops = None, []

    def _lost(self, doing: str, why: str) -> TransportError:
        """The error for a connection that went away while `doing` something."""
        via = f" (ProxyJump {self.spec.proxy_jump})" if self.spec.proxy_jump else ""
        return TransportError(
            f"endpoint {self.name} ({self.where}): lost the SSH connection to {self.spec.alias} "
            f"({self.spec.key_name}){via} while {doing}: {why}",
            _LOST_HINT,
        )

    def _control_path(self) -> str:
        global _swept_control_dirs
        if self._control_dir is None:
            if not _swept_control_dirs:  # once a run: those of runs that were killed
                _swept_control_dirs = True
                with contextlib.suppress(OSError):
                    remove_stale_control_dirs()
            try:
                self._control_dir = tempfile.mkdtemp(prefix=f"{_CONTROL_PREFIX}{os.getpid()}-")
            except OSError as exc:
                raise TransportError(
                    f"endpoint {self.name}: cannot create the ssh ControlMaster dir in "
                    f"{tempfile.gettempdir()}: {exc}",
                    "free space in the temp dir or set TMPDIR to a writable one",
                ) from None
        return os.path.join(self._control_dir, "cm")

    def ssh_argv(self) -> list[str]:
        """`ssh ... -- host` prefix for subprocess use (rsync -e, spawn)."""
        return [*ssh_command(self.spec, self.options, self._control_path()), self.spec.alias]

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self._control_dir is not None:
            with contextlib.suppress(Exception):
                subprocess.run(
                    [
                        *ssh_command(self.spec, self.options, self._control_path()),
                        "-O",
                        "exit",
                        self.spec.alias,
                    ],
                    capture_output=True,
                    timeout=10,
                )
            shutil.rmtree(self._control_dir, ignore_errors=True)
            self._control_dir = None
        self._drop_connection()

    # -- Transport primitives -----------------------------------------------------------------
    def _exec(
        self, command: str, stdin: bytes | None = None, timeout: float | None = 600
    ) -> tuple[int, bytes, bytes]:
        client = self._connect()
        shown = command if len(command) <= 80 else command[:77] + "..."
        chan = None
        try:
            chan_in, chan_out, chan_err = client.exec_command(command, timeout=timeout)
            chan = chan_out.channel
            if stdin is not None:
                chan_in.write(stdin)
            chan.shutdown_write()
            out = chan_out.read()
            err = chan_err.read()
            rc = chan.recv_exit_status()
        except Exception as exc:  # socket errors, timeouts, a dropped connection
            why = _link_down(client)
            if why is not None:
                self._drop_connection()
                raise self._lost(f"running `{shown}`", why) from None
            if isinstance(exc, TimeoutError):
                raise TransportError(
                    f"endpoint {self.name} ({self.where}): `{shown}` did not finish within {timeout:g} s",
                    "check what the endpoint is busy with; rerun the command to resume",
                ) from None
            raise TransportError(
                f"endpoint {self.name} ({self.where}): running a remote command failed: {_say(exc)}",
                "check the connection; rerun the command to resume",
            ) from None
        finally:
            if chan is not None:
                with contextlib.suppress(Exception):
                    chan.close()
        if rc == -1 and (why := _link_down(client)) is not None:  # no exit status: the link went
            self._drop_connection()
            raise self._lost(f"running `{shown}`", why)
        return rc, out, err

    def _agent_channel(self):
        """Start (once a connection) the remote python3 agent that runs endpoint_ops requests."""
        if self._agent is not None and _link_down(self._client) is not None:
            self._drop_connection()  # went away between requests: nothing was lost, start again
        if self._agent is None:
            client = self._connect()
            try:
                chan = client.get_transport().open_session()
                chan.exec_command("python3 -c " + shlex.quote(_AGENT))
                stdin, stdout = chan.makefile_stdin("wb"), chan.makefile("rb")
                stdin.write(json.dumps(_OPS_SOURCE).encode() + b"\n")
                stdin.flush()
            except Exception as exc:  # a dropped connection, a refused channel
                why = _link_down(client)
                if why is not None:
                    self._drop_connection()
                    raise self._lost("starting the remote python3", why) from None
                raise TransportError(
                    f"endpoint {self.name} ({self.where}): cannot start remote python3: {_say(exc)}",
                    "check the connection and that python3 runs there",
                ) from None
            self._agent = (chan, stdin, stdout)
        return self._agent

    def _close_agent(self) -> None:
        """Close the agent's channel and its file objects now: paramiko's BufferedFile.__del__ would
        otherwise flush into the closed channel at exit ("Exception ignored ... closed file")."""
        chan, stdin, stdout = self._agent
        self._agent = None
        for thing in (stdin, stdout, chan):
            with contextlib.suppress(Exception):
                thing.close()

    def _call_raw(self, request: dict) -> dict:
        with self._lock:
            chan, stdin, stdout = self._agent_channel()
            failure = ""
            try:
                stdin.write(json.dumps(request).encode() + b"\n")
                stdin.flush()
                line = stdout.readline()
            except Exception as exc:  # the channel broke under us
                line, failure = b"", _say(exc)
            if line.endswith(b"\n"):
                return json.loads(line.decode())
            why = _link_down(self._client)
            if why is not None:  # the connection went, not (only) the agent
                self._drop_connection()
                raise self._lost(f"running {request.get('op')}", failure or why)
            err = b""
            with contextlib.suppress(Exception):
                err = chan.makefile_stderr("rb").read()
            rc = chan.recv_exit_status() if chan.exit_status_ready() else -1
            self._close_agent()  # the agent is gone: say why; the next call starts a new one
        if rc == 127 or b"python3: command not found" in err or b"python3: not found" in err:
            raise TransportError(
                f"endpoint {self.name} ({self.where}): python3 is not installed there",
                "install it (macOS: `xcode-select --install`; Debian/Ubuntu: `apt install python3`)",
            )
        why = " ".join([failure, *err.decode(errors="replace").strip().splitlines()[-3:]]).strip()
        raise TransportError(
            f"endpoint {self.name} ({self.where}): remote python3 stopped (exit {rc}): {why}",
            "adapterctl needs python3 >= 3.8 on the endpoint",
        )

    def run(
        self, argv: Sequence[str], input: str | None = None, timeout: float | None = None
    ) -> CommandResult:
        rc, out, err = self._exec(shlex.join(argv), input.encode() if input is not None else None, timeout)
        return CommandResult(tuple(argv), rc, out.decode(errors="replace"), err.decode(errors="replace"))

    def _popen(self, what: str, argv: list[str], **kw) -> subprocess.Popen:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw
            )
        except OSError as exc:
            raise TransportError(
                f"endpoint {self.name} ({self.where}): cannot start {what}: {exc}",
                f"install {what} on this machine",
            ) from None
        self._procs.append(proc)
        return proc

    def spawn(
        self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None
    ) -> subprocess.Popen:
        remote = (
            shlex.join(["env", *(f"{k}={v}" for k, v in (env or {}).items()), *argv])
            if env
            else shlex.join(argv)
        )
        if cwd:
            remote = f"cd {shlex.quote(cwd)} && {remote}"
        return self._popen("ssh", [*self.ssh_argv(), "--", remote])

    def sync_files(
        self,
        src: Path,
        dest: str,
        names: Sequence[str],
        basis: str | None = None,
        progress: ProgressFn | None = None,
        resume: bool = False,
    ) -> SyncResult:
        if not names:
            return SyncResult(0, 0)
        if shutil.which("rsync") is None:
            raise TransportError(
                "rsync is not installed on this machine",
                "install it (`apt install rsync`, macOS: `brew install rsync`)",
            )
        self._connect()  # fail with the paramiko host-key/login message first
        ssh = shlex.join(self.ssh_argv()[:-1])
        argv = [
            "rsync",
            # paths go to the remote rsync through the protocol, never through its shell
            "--protect-args",
            "--info=progress2",
            "-a",
            "--partial-dir=" + endpoint_ops.PARTIAL_DIR,
            "--delay-updates",
            "--stats",
            "--files-from=-",
            "--from0",
            "-e",
            ssh,
        ]
        if basis:  # delta transfer against the previous release's copy (worth it for mostly-unchanged files)
            # --ignore-times: only files whose sha256 differs are listed, so rsync's size+mtime quick
            # check must not decide that a same-size, same-second file is the basis's and skip it
            argv += [f"--link-dest={basis}", "--no-whole-file", "--ignore-times"]
        elif resume:  # pieces of an interrupted transfer wait in the partial dir: delta against them
            argv.append("--no-whole-file")
        else:  # retrained weights change in every byte: rsync's delta search would only cost time
            argv.append("--whole-file")
        argv += [f"{src}/", f"{self.spec.alias}:{dest}/"]
        proc = self._popen("rsync", argv, env=_rsync_env(), preexec_fn=_die_with_parent)
        try:
            proc.stdin.write(b"\0".join(n.encode() for n in names))
        except BrokenPipeError:  # rsync already stopped: its exit code and stderr say why
            pass
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        err_chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
        reader.start()
        out = _follow_progress(proc.stdout, progress)
        proc.wait()
        reader.join()
        err = b"".join(err_chunks).decode(errors="replace")
        if proc.returncode != 0:
            raise self._rsync_error(proc.returncode, err)
        m = _BYTES_SENT.search(out)
        sent = int(m.group(1).replace(",", "").replace(".", "")) if m else 0
        return SyncResult(len(names), sent)

    def _rsync_error(self, rc: int, err: str) -> TransportError:
        """What a failed rsync (exit `rc`, stderr `err`) means: a known cause with its fix, a lost
        connection, or rsync's own last words."""
        hint = self._rsync_hint(err)
        if hint is None and rc in _RSYNC_LINK_CODES and _LINK_LOST.search(err):
            return self._lost("sending files with rsync", f"rsync exit {rc}: {_last_lines(err)}")
        return TransportError(
            f"endpoint {self.name} ({self.where}): rsync failed (exit {rc}): {_last_lines(err)}", hint
        )

    @staticmethod
    def _rsync_hint(err: str) -> str | None:
        hints = (
            (
                ("rsync: command not found", "rsync: not found", "rsync: No such file"),
                "rsync is missing on the endpoint: install it there (apt install rsync / brew install rsync)",
            ),
            (
                ("No space left",),
                "the endpoint's disk is full: free space (or lower keep_releases) and rerun",
            ),
            (
                ("Permission denied",),
                "the SSH user cannot write the adapter_dir: fix ownership/permissions, rerun",
            ),
            (
                ("Host key verification failed",),
                "the host key is unknown or changed: run `adapterctl doctor`",
            ),
            (
                ("unknown option", "protect-args"),
                "the endpoint's rsync is too old: adapterctl needs rsync >= 3.0 there "
                "(apt install rsync / brew install rsync)",
            ),
        )
        return next((hint for needles, hint in hints if any(n in err for n in needles)), None)
