"""SSHTransport: an endpoint reached over SSH, configured by the user's ~/.ssh/config.

Two channels, one host-key policy:
- endpoint operations run through one paramiko connection per endpoint (reused for the run):
  the remote `python3` executes `endpoint_ops` sent over stdin, so nothing is installed there;
- rsync and spawned programs use the system OpenSSH client with a ControlMaster socket, the
  same ssh_config and the same known_hosts files.
Unknown host keys are refused on both (paramiko RejectPolicy, `StrictHostKeyChecking=yes`)
unless the user passes --accept-new-host-keys; a changed key is always refused.
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
import subprocess
import sys
import tempfile
import threading
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


class _HostKeyPolicy:
    """Refuse unknown keys (with the fingerprint and the fix), or accept and record them."""

    def __init__(self, endpoint: str, spec: HostSpec, accept_new: bool):
        self.endpoint, self.spec, self.accept_new = endpoint, spec, accept_new

    def missing_host_key(self, client, hostname, key) -> None:
        if not self.accept_new:
            raise TransportError(
                f"endpoint {self.endpoint}: host key of {hostname} is unknown "
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
    ]
    if control_path:
        # bounded: a master orphaned by a killed run goes away by itself
        cmd += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_path}", "-o", "ControlPersist=30"]
    if spec.user:
        cmd += ["-l", spec.user]
    cmd += ["-p", str(spec.port)]
    return cmd


def _die_with_parent() -> None:
    """In the rsync child (Linux): die with adapterctl, so a killed run leaves no writer behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_PROGRESS = re.compile(rb"^\s*([\d,.]+)\s+\d+%")


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


class SSHTransport(Transport):
    """Reach one endpoint over SSH. Connects lazily; `close()` ends every connection it made."""

    def __init__(
        self, name: str, alias: str, options: SSHOptions, user: str | None = None, port: int | None = None
    ):
        self.options = options
        self.spec = resolve_host(alias, options, user, port)
        super().__init__(name, f"{self.spec.user + '@' if self.spec.user else ''}{alias}")
        self._client = None
        self._jump = None
        self._agent = None  # (channel, stdin, stdout) of the remote endpoint_ops agent
        self._lock = threading.RLock()  # _call_raw holds it while _connect takes it
        self._control_dir: str | None = None
        self._procs: list[subprocess.Popen] = []

    # -- connections ------------------------------------------------------------------------
    def _connect(self):
        import paramiko

        with self._lock:
            if self._client is not None:
                return self._client
            spec = self.spec
            client = paramiko.SSHClient()
            for path in spec.known_hosts:
                if os.path.isfile(path):
                    client.load_system_host_keys(path)
            client.set_missing_host_key_policy(
                _HostKeyPolicy(self.name, spec, self.options.accept_new_host_keys)
            )
            sock = None
            if spec.proxy_jump:
                sock = self._jump_channel(spec)
            keys = [f for f in spec.identity_files if os.path.isfile(f)]
            try:
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
            except paramiko.BadHostKeyException as exc:
                client.close()
                raise TransportError(
                    f"endpoint {self.name}: host key of {spec.key_name} CHANGED: the host offered "
                    f"{fingerprint(exc.key)}, known_hosts has {fingerprint(exc.expected_key)} — refusing "
                    "(possible man-in-the-middle); nothing was changed",
                    f"if the host was really reinstalled, remove the old key with "
                    f"`ssh-keygen -R '{spec.key_name}' -f {spec.known_hosts[0]}` and reconnect",
                ) from None
            except TransportError:
                client.close()
                raise
            except paramiko.AuthenticationException as exc:
                client.close()
                raise TransportError(
                    f"endpoint {self.name}: SSH login to {self.where} ({spec.key_name}) refused: {exc}",
                    f"check User/IdentityFile for {spec.alias} in {spec.config_path or '~/.ssh/config'}; "
                    f"`ssh {spec.alias} true` must work without a password",
                ) from None
            except (OSError, paramiko.SSHException) as exc:
                client.close()
                raise TransportError(
                    f"endpoint {self.name}: cannot connect to {self.where} ({spec.key_name}): {exc}",
                    f"check the host is up and `ssh {spec.alias} true` works",
                ) from None
            self._client = client
            return client

    def _jump_channel(self, spec: HostSpec):
        hop = spec.proxy_jump.split(",")[-1]
        user, _, rest = hop.rpartition("@")
        host, _, port = rest.partition(":")
        self._jump = SSHTransport(
            f"{self.name} (jump {host})", host, self.options, user or None, int(port) if port else None
        )
        jump_client = self._jump._connect()
        try:
            return jump_client.get_transport().open_channel(
                "direct-tcpip", (spec.hostname, spec.port), ("127.0.0.1", 0)
            )
        except Exception as exc:
            raise TransportError(
                f"endpoint {self.name}: ProxyJump {hop} cannot reach {spec.hostname}:{spec.port}: {exc}"
            ) from None

    def _control_path(self) -> str:
        if self._control_dir is None:
            self._control_dir = tempfile.mkdtemp(prefix="adctl-")  # short: socket paths are length-limited
        return os.path.join(self._control_dir, "cm")

    def ssh_argv(self) -> list[str]:
        """`ssh ... -- host` prefix for subprocess use (rsync -e, spawn)."""
        return [*ssh_command(self.spec, self.options, self._control_path()), self.spec.alias]

    def close(self) -> None:
        if self._agent is not None:
            self._close_agent()
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
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._jump is not None:
            self._jump.close()
            self._jump = None

    # -- Transport primitives -----------------------------------------------------------------
    def _exec(
        self, command: str, stdin: bytes | None = None, timeout: float | None = 600
    ) -> tuple[int, bytes, bytes]:
        client = self._connect()
        try:
            chan_in, chan_out, chan_err = client.exec_command(command, timeout=timeout)
            if stdin is not None:
                chan_in.write(stdin)
            chan_in.channel.shutdown_write()
            out = chan_out.read()
            err = chan_err.read()
            return chan_out.channel.recv_exit_status(), out, err
        except Exception as exc:  # socket errors, timeouts, a dropped connection
            raise TransportError(
                f"endpoint {self.name} ({self.where}): running a remote command failed: {exc}",
                "check the connection; rerun the command to resume",
            ) from None

    def _agent_channel(self):
        """Start (once) the remote python3 agent that runs endpoint_ops requests."""
        if self._agent is None:
            client = self._connect()
            try:
                chan = client.get_transport().open_session()
                chan.exec_command("python3 -c " + shlex.quote(_AGENT))
                stdin, stdout = chan.makefile_stdin("wb"), chan.makefile("rb")
                stdin.write(json.dumps(_OPS_SOURCE).encode() + b"\n")
                stdin.flush()
            except Exception as exc:  # a dropped connection, a refused channel
                raise TransportError(
                    f"endpoint {self.name} ({self.where}): cannot start remote python3: {exc}",
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
                line, failure = b"", str(exc)
            if line:
                return json.loads(line.decode())
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
        proc = subprocess.Popen(
            [*self.ssh_argv(), "--", remote],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._procs.append(proc)
        return proc

    def sync_files(
        self,
        src: Path,
        dest: str,
        names: Sequence[str],
        basis: str | None = None,
        progress: ProgressFn | None = None,
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
        else:  # retrained weights change in every byte: rsync's delta search would only cost time
            argv.append("--whole-file")
        argv += [f"{src}/", f"{self.spec.alias}:{dest}/"]
        argv.insert(1, "--info=progress2")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        self._procs.append(proc)
        proc.stdin.write(b"\0".join(n.encode() for n in names))
        proc.stdin.close()
        err_chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
        reader.start()
        out = _follow_progress(proc.stdout, progress)
        proc.wait()
        reader.join()
        err = b"".join(err_chunks).decode(errors="replace")
        if proc.returncode != 0:
            raise TransportError(self._rsync_problem(proc.returncode, err), self._rsync_hint(err))
        m = _BYTES_SENT.search(out)
        sent = int(m.group(1).replace(",", "").replace(".", "")) if m else 0
        return SyncResult(len(names), sent)

    def _rsync_problem(self, rc: int, err: str) -> str:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()][-3:]
        return f"endpoint {self.name} ({self.where}): rsync failed (exit {rc}): {' | '.join(lines)}"

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
        )
        return next((hint for needles, hint in hints if any(n in err for n in needles)), None)
