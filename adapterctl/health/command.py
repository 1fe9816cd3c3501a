"""The `command` health engine, and ModelProcessEngine: a command that loads a model first, which
the `mlx` and `llamacpp` engines (engine_mlx.py, engine_llamacpp.py) are."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence

from adapterctl.errors import ConfigError, PhaseError, TransportError
from adapterctl.health.base import HealthEngine, HealthTarget, check_template, show_argv

_STDERR_KEEP = 8192  # bytes of stderr kept for error messages
_STDERR_LINES = 5
_MAX_LINE = 1 << 20  # an output line longer than this means the program is not line-oriented
_CLOSE_GRACE_S = 1.0


class CommandEngine(HealthEngine):
    """Runs `argv` once on the endpoint and talks to it one line in, one line out."""

    name = "command"

    def __init__(self, argv: Sequence[str], timeout_s: float = 30.0, env: Mapping[str, str] | None = None):
        """Raises ConfigError for an empty command, an unknown placeholder or a bad timeout."""
        if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
            raise ConfigError(
                "health command must be a non-empty list of strings",
                'e.g. command: [python3, translate.py, "{release}"]',
            )
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
            raise ConfigError(f"health timeout_s must be a positive number of seconds, not {timeout_s!r}")
        check_template(argv)
        self.argv_template = tuple(argv)
        self.timeout_s = float(timeout_s)
        self.env = dict(env or {})
        self._proc: subprocess.Popen | None = None
        self._target: HealthTarget | None = None
        self._argv: tuple[str, ...] = ()
        self._sel: selectors.BaseSelector | None = None
        self._out = bytearray()
        self._out_eof = False
        self._err = bytearray()
        self._failed: PhaseError | None = None

    def describe(self) -> str:
        return f"command: {show_argv(self.argv_template)}"

    def start(self, target: HealthTarget) -> None:
        """Spawn the program through target.transport. Raises PhaseError if it cannot start."""
        if self._proc is not None:
            raise RuntimeError("CommandEngine.start() called twice")
        values = {
            "release": target.release_path,
            "model": target.model,
            "version": target.version_id,
            "endpoint": target.endpoint,
            "adapter_dir": target.adapter_dir,
        }
        self._target = target
        self._argv = tuple(a.format_map(values) for a in self.argv_template)
        env = {
            **self.env,
            "ADAPTERCTL_RELEASE": target.release_path,
            "ADAPTERCTL_MODEL": target.model,
            "ADAPTERCTL_VERSION": target.version_id,
        }
        try:
            proc = target.transport.spawn(self._argv, env=env)
        except TransportError as exc:
            raise PhaseError(
                f"{self._where()}: cannot start health command {shlex.join(self._argv)}: {exc.message}",
                exc.hint or "check that the command exists on the endpoint",
            ) from exc
        self._proc = proc
        self._sel = selectors.DefaultSelector()
        # Non-blocking pipes + one selector: a stalled program can never block us past the timeout.
        for stream, tag in ((proc.stdout, "out"), (proc.stderr, "err")):
            os.set_blocking(stream.fileno(), False)
            self._sel.register(stream.fileno(), selectors.EVENT_READ, tag)
        os.set_blocking(proc.stdin.fileno(), False)

    def generate(self, prompt: str) -> str:
        """Send `prompt` as one line and return the next output line (without its newline).

        Raises PhaseError (and kills the program) if it exits, exceeds timeout_s or writes
        non-UTF-8; every later call raises the same error.
        """
        if self._failed is not None:
            raise self._failed
        if self._proc is None or self._sel is None:
            raise RuntimeError("CommandEngine.generate() called before start()")
        pending = (re.sub(r"\r\n|[\r\n]", " ", prompt) + "\n").encode("utf-8")
        stdin_fd = self._proc.stdin.fileno()
        self._sel.register(stdin_fd, selectors.EVENT_WRITE, "in")
        writing = True
        deadline = time.monotonic() + self.timeout_s
        try:
            while writing or b"\n" not in self._out:
                if self._out_eof and b"\n" not in self._out:
                    raise self._fail("exited before answering", grace_s=_CLOSE_GRACE_S)
                if len(self._out) > _MAX_LINE:
                    raise self._fail(f"wrote more than {_MAX_LINE} bytes without a newline")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._fail(f"gave no output line within {self.timeout_s:g} s (killed)")
                for key, _ in self._sel.select(remaining):
                    if key.data != "in":
                        self._read(key)
                        continue
                    try:
                        pending = pending[os.write(stdin_fd, pending) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = b""  # it closed stdin; its exit shows up as EOF on stdout
                    if not pending:
                        self._sel.unregister(stdin_fd)
                        writing = False
        finally:
            if self._sel is not None and stdin_fd in self._sel.get_map():
                self._sel.unregister(stdin_fd)
        raw, _, rest = self._out.partition(b"\n")
        self._out = bytearray(rest)
        try:
            return raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError:
            raise self._fail("wrote non-UTF-8 output") from None

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.close()  # EOF tells a well-behaved program to exit
        _reap(proc, _CLOSE_GRACE_S)
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        for stream in (proc.stdout, proc.stderr):
            stream.close()

    # -- internals ------------------------------------------------------------------------------
    def _where(self) -> str:
        t = self._target
        return f"endpoint {t.endpoint}: model {t.model}" if t else "health command"

    def _read(self, key: selectors.SelectorKey) -> None:
        try:
            chunk = os.read(key.fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self._sel.unregister(key.fd)
            if key.data == "out":
                self._out_eof = True
        elif key.data == "out":
            self._out += chunk
        else:
            self._err += chunk
            del self._err[:-_STDERR_KEEP]

    def _fail(self, what: str, grace_s: float = 0.0) -> PhaseError:
        """Stop the program, collect its exit code and stderr tail, and remember the error."""
        _reap(self._proc, grace_s)
        if self._proc.stdin.fileno() in self._sel.get_map():
            self._sel.unregister(self._proc.stdin.fileno())
        deadline = time.monotonic() + 0.5  # the stderr of a dead program ends almost at once
        while self._sel.get_map() and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in self._sel.select(remaining):
                self._read(key)
        lines = self._err.decode("utf-8", "replace").splitlines()[-_STDERR_LINES:]
        stderr = f"stderr: {' | '.join(lines)}" if lines else "no stderr output"
        self._failed = PhaseError(
            f"{self._where()}: health command {shlex.join(self._argv)} {what} "
            f"(exit code {self._proc.returncode}); {stderr}",
            "run the command by hand on the endpoint with one input line to see what it does",
        )
        return self._failed


def _reap(proc: subprocess.Popen, grace_s: float) -> None:
    """Wait up to grace_s for `proc` to exit, then kill it; always collects its exit status."""
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        # An unkillable process (uninterruptible I/O) is left behind rather than hanging us.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)


class ModelProcessEngine(CommandEngine):
    """A CommandEngine whose program loads a model first: `start()` waits for it to answer an
    empty readiness line, so loading never counts against the first sentence's latency limit.

    Subclasses set `kind` (for messages) and `hint` (what to check when loading fails).
    """

    kind = "model"
    hint: str | None = None

    def start(self, target: HealthTarget) -> None:
        """Start the program and wait until the model is loaded. Raises PhaseError naming the
        command and its stderr (e.g. a missing model file)."""
        super().start(target)
        try:
            ready = super().generate("")  # the readiness probe: answered once the model is loaded
        except PhaseError as exc:
            raise PhaseError(f"{exc.message} (while loading the model)", self.hint) from exc
        if ready != "":
            raise PhaseError(
                f"{self._where()}: {show_argv(self._argv)} answered the readiness probe with {ready!r}, "
                f"not an empty line; is it adapterctl's {self.kind} engine?",
                self.hint,
            )
