"""Deploying over SSH against bare rsync, on real sshd hosts: the issue's three targets side by side.

Starts 4 sshd test hosts on loopback (tests/sshhosts.py; mac-1 emulates a Mac's BSD userland),
writes --models random PEFT LoRA adapters of --size-mb each, and times (time.perf_counter):

  1. the first deploy of those adapters to a fresh endpoint against `rsync -a -e "ssh -F cfg"` of
     the same directories to a fresh directory on the same host (target: ratio <= 1.15), in both
     orders, and once more with the page cache dropped before each run if the kernel allows it;
  2. a no-change redeploy (everything already active) to 1 and to 4 endpoints, in seconds per
     endpoint (target: <= 1 s), against a no-change bare rsync;
  3. the first deploy of a new cycle (every adapter regenerated) to 1 host and to 4 hosts with
     --parallel 4 (target: 4 hosts / 1 host <= 1.3), against bare rsync to 1 and 4 fresh dirs;
     plus bare rsync of new weights with --link-dest=<previous copy>, as adapterctl's rsync runs.

Nothing is asserted: it prints the numbers, the targets, where adapterctl's time went (from the
time each progress line reached stderr) and the machine facts. All hosts share this machine's
CPUs and disk, so 4 "hosts" compete for the same cores; real hosts would not.
Run: python bench/ssh_deploy.py [--size-mb 100] [--models 3] [--no-drop-caches] [--timelines]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import load_sshhosts  # noqa: E402

from adapterctl.demo import make_adapter  # noqa: E402

HOSTS = [("linux-1", False), ("linux-2", False), ("linux-3", False), ("mac-1", True)]
ONE = "linux-1"  # the host of the single-host measurements
ALL = [alias for alias, _ in HOSTS]
# adapter shape: 32 layers x (q_proj, v_proj) x (lora_A [r, hidden] + lora_B [hidden, r]) float32
LAYERS, RANK, TARGETS = 32, 64, ("q_proj", "v_proj")
BYTES_PER_HIDDEN = LAYERS * len(TARGETS) * 2 * RANK * 4
CLI_TIMEOUT_S = 900
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


@dataclass
class Run:
    """One timed command: wall seconds, exit code, stderr lines with their arrival times."""

    seconds: float
    rc: int
    stdout: str = ""
    lines: list[tuple[float, str]] = field(default_factory=list)

    @property
    def report(self) -> dict | None:
        try:
            return json.loads(self.stdout)
        except ValueError:
            return None

    def bytes_sent(self) -> int:
        return sum(o.get("bytes_sent", 0) for o in (self.report or {}).get("outcomes", []))

    def statuses(self) -> str:
        counts: dict[str, int] = {}
        for o in (self.report or {}).get("outcomes", []):
            counts[o["status"]] = counts.get(o["status"], 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no steps: already active"


class Bench:
    def __init__(self, tmp: Path, hosts, size_mb: float, models: int, show_timelines: bool):
        self.tmp, self.hosts, self.show_timelines = tmp, hosts, show_timelines
        self.ws = tmp / "ws"
        self.models = [f"model_{i}" for i in range(models)]
        self.hidden = max(64, round(size_mb * 2**20 / BYTES_PER_HIDDEN))
        self.config = self.ws / "adapterctl.yaml"
        # the CLI's own temp dirs (ControlMaster sockets) go under ours, removed with it
        self.cli_tmp = tmp / "cli-tmp"
        self.cli_tmp.mkdir(parents=True, exist_ok=True)
        self.env = dict(
            hosts.env(), ADAPTERCTL_CONFIG=str(self.config), COLUMNS="200", TMPDIR=str(self.cli_tmp)
        )
        self.ssh_e = f"ssh -F {hosts.ssh_config}"
        self.failures: list[str] = []

    # -- setup --------------------------------------------------------------------------------
    def write_config(self) -> None:
        lines = ["store: ./store", "keep_releases: 5", "endpoints:"]
        for alias, bsd in HOSTS:
            lines += [
                f"  {alias}:",
                f"    host: {alias}",
                f"    adapter_dir: {self.hosts.hosts[alias].adapter_dir}",
                f"    kind: {'mlx' if bsd else 'gguf'}",
                "    reload_method: none",
            ]
        lines.append("models:")  # no `health:` key: structural checks only, no model is run
        for m in self.models:
            lines += [f"  {m}:", f"    source: ./training/{m}", "    base_model: bench/none"]
        self.ws.mkdir(parents=True, exist_ok=True)
        self.config.write_text("\n".join(lines) + "\n")

    def generate(self, generation: int) -> float:
        """(Re)write every model's adapter in place with new random weights; returns seconds."""
        t = time.perf_counter()
        for i, m in enumerate(self.models):
            path = self.ws / "training" / m
            shutil.rmtree(path, ignore_errors=True)
            make_adapter(
                path, seed=1000 * generation + i, layers=LAYERS, hidden=self.hidden, r=RANK, targets=TARGETS
            )
        return time.perf_counter() - t

    def adapter_bytes(self) -> int:
        return sum(f.stat().st_size for f in (self.ws / "training").rglob("*") if f.is_file())

    def reset(self) -> None:
        """Forget every deploy: the training box's store/manifest and every endpoint's adapter_dir."""
        shutil.rmtree(self.ws / "store", ignore_errors=True)
        for h in self.hosts.hosts.values():
            shutil.rmtree(h.adapter_dir, ignore_errors=True)

    def bare_dir(self, alias: str, name: str) -> Path:
        return self.hosts.hosts[alias].root / name

    # -- timed commands -------------------------------------------------------------------------
    def _timed(self, argv: list[str]) -> Run:
        lines: list[tuple[float, str]] = []
        out: list[str] = []
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            cwd=self.ws,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def read_err() -> None:
            for line in proc.stderr:
                lines.append((time.perf_counter() - t0, line.rstrip("\n")))

        readers = [
            threading.Thread(target=read_err, daemon=True),
            threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True),
        ]
        for r in readers:
            r.start()
        try:
            rc = proc.wait(CLI_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        seconds = time.perf_counter() - t0
        for r in readers:
            r.join(10)
        return Run(seconds, rc, "".join(out), lines)

    def deploy(self, label: str, cycle: int, endpoints: list[str]) -> Run:
        argv = [sys.executable, "-m", "adapterctl", "--ssh-config", str(self.hosts.ssh_config), "deploy"]
        argv += ["--cycle", str(cycle), "--all-adapters", "--endpoints", *endpoints]
        argv += ["--parallel", "4", "--json"]
        run = self._timed(argv)
        sent = run.bytes_sent() / 2**20
        print(
            f"  adapterctl {label:<46} {run.seconds:7.2f} s  exit {run.rc}  "
            f"sent {sent:7.1f} MiB  ({run.statuses()})",
            flush=True,
        )
        if run.rc != 0:
            self.failures.append(f"adapterctl {label}: exit {run.rc}")
            for _, line in run.lines[-15:]:
                print(f"      stderr| {line}")
        if self.show_timelines:
            print_timeline(run)
        return run

    def rsync(
        self, label: str, aliases: list[str], dest_name: str, fresh: bool, extra: list[str] | None = None
    ) -> float:
        """Bare `rsync -a` of the adapter dirs to host:<root>/<dest_name>/, all hosts at once."""
        if fresh:
            for a in aliases:
                shutil.rmtree(self.bare_dir(a, dest_name), ignore_errors=True)
        srcs = [f"training/{m}" for m in self.models]
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                [
                    "rsync",
                    "-a",
                    *(extra or []),
                    "-e",
                    self.ssh_e,
                    *srcs,
                    f"{a}:{self.bare_dir(a, dest_name)}/",
                ],
                cwd=self.ws,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for a in aliases
        ]
        errs = [p.communicate(timeout=CLI_TIMEOUT_S)[1] for p in procs]
        seconds = time.perf_counter() - t0
        codes = [p.returncode for p in procs]
        print(f"  rsync      {label:<46} {seconds:7.2f} s  exit {max(codes)}", flush=True)
        if any(codes):
            self.failures.append(f"rsync {label}: exit {codes}")
            print("      " + " | ".join(e.strip() for e in errs if e.strip()))
        return seconds


# -- where the time went ----------------------------------------------------------------------------
PHASE_OF = (
    ("registered", "version (hash + copy into store)"),
    ("already registered", "version (hash + copy into store)"),
    ("sent ", "transfer: prepare staging + rsync (+ the previous model's post-swap steps)"),
    ("published", "publish: hash on the endpoint + rename"),
    ("hashes verified", "verify_release (hash on endpoint)"),
    ("active →", "activate: health (none here) + swap links"),
    ("health-check", "health check"),
    ("pruned", "prune"),
)
_EP = re.compile(r"^\[([^\]]+)\] ")


def progress_lines(run: Run) -> list[tuple[float, str]]:
    """Progress lines only: the plan render (a 'Plan ...' line and indented lines) is one event."""
    out = []
    for t, line in run.lines:
        if line.startswith("Plan "):
            out.append((t, f"<plan printed: endpoints' facts read, {line.split(';')[-1].strip()}>"))
        elif line.strip() and not line.startswith(" "):
            out.append((t, line))
    return out


def print_timeline(run: Run, title: str = "") -> None:
    if title:
        print(f"\n{title}  (seconds since the CLI started; each line is printed when its step ends)")
    prev = 0.0
    for t, line in progress_lines(run):
        print(f"    {t:7.2f}  +{t - prev:6.2f}  {line[:110]}")
        prev = t
    print(f"    {run.seconds:7.2f}  +{run.seconds - prev:6.2f}  <exit {run.rc}: report printed, SSH closed>")


def phase_breakdown(run: Run) -> dict[str, float]:
    """Seconds per phase: each gap between an endpoint's lines goes to the step whose line ends it.

    The gap before the first line (start-up, config, hashing the sources to plan, reading every
    endpoint's facts over SSH) is 'start-up + plan'; steps that print nothing (lock, convert) are
    folded into the next line's step. With several endpoints, their gaps overlap in time.
    """
    totals: dict[str, float] = {}
    last_global = 0.0
    last_ep: dict[str, float] = {}
    plan_at = None
    for t, line in progress_lines(run):
        if line.startswith("<plan printed"):
            totals["start-up + plan (hash sources, read facts over SSH)"] = t
            plan_at = last_global = t
            continue
        m = _EP.match(line)
        ep = m.group(1) if m else None
        prev = last_ep.get(ep, last_global) if ep else last_global
        phase = next((p for key, p in PHASE_OF if key in line), "other")
        totals[phase] = totals.get(phase, 0.0) + (t - prev)
        if ep:
            last_ep[ep] = t
        else:
            last_global = t
            for k in last_ep:
                last_ep[k] = max(last_ep[k], t)
    end = max([last_global, *last_ep.values()]) if plan_at is not None else 0.0
    totals["after the last line (report, SSH close, exit)"] = run.seconds - end
    return totals


def print_breakdown(run: Run, title: str) -> None:
    print(f"\n{title}: {run.seconds:.2f} s, per phase (summed over endpoints where they overlap)")
    for phase, s in phase_breakdown(run).items():
        print(f"    {s:7.2f} s  {phase}")


# -- machine facts ------------------------------------------------------------------------------
def machine_facts() -> list[str]:
    def first_line(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return ((p.stdout or p.stderr).strip().splitlines() or ["?"])[0]
        except OSError:
            return "not found"

    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "?")
    return [
        f"nproc {os.cpu_count()} ({cpu}), {platform.system()} {platform.release()}",
        f"python {platform.python_version()}; {first_line(['rsync', '--version'])}",
        f"{first_line(['ssh', '-V'])}",
    ]


# -- the benchmark ------------------------------------------------------------------------------
def drop_caches() -> str | None:
    """Drop the page cache; returns None on success, else why it was not possible."""
    try:
        subprocess.run(["sync"], check=True)
        DROP_CACHES.write_text("3\n")
        return None
    except OSError as exc:
        return f"{DROP_CACHES} not writable ({exc.strerror or exc})"


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt_s(s: float | None) -> str:
    return "-" if s is None else f"{s:.2f} s"


def fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size-mb", type=float, default=100, help="size of each adapter (default 100)")
    ap.add_argument("--models", type=int, default=3, help="how many model adapters (default 3)")
    ap.add_argument("--noop-runs", type=int, default=3, help="median of N no-change redeploys (default 3)")
    ap.add_argument("--no-drop-caches", action="store_true", help="skip the page-cache-dropped pair")
    ap.add_argument("--timelines", action="store_true", help="print every adapterctl run's stderr timeline")
    args = ap.parse_args()

    sshhosts = load_sshhosts()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ssh-"))
    hosts = None
    started = time.perf_counter()
    load0 = load_avg()
    try:
        hosts = sshhosts.start_hosts(tmp / "hosts", HOSTS)
        b = Bench(tmp, hosts, args.size_mb, args.models, args.timelines)
        b.write_config()
        gen_s = b.generate(1)
        total = b.adapter_bytes()
        mib = total / 2**20
        print(
            f"{len(ALL)} sshd hosts on loopback ({', '.join(ALL)}; mac-1 BSD-like); "
            f"{len(b.models)} adapters x {mib / len(b.models):.1f} MiB = {mib:.1f} MiB "
            f"(r={RANK}, hidden={b.hidden}, {LAYERS} layers, random float32), written in {gen_s:.1f} s\n"
        )
        rows: list[tuple[str, str, str, str, str, str]] = []

        def row(metric: str, ctl: float, base: float, target: str = "", limit: float | None = None) -> None:
            ratio = ctl / base if base else None
            value = ratio if target.endswith("x") else ctl
            met = "" if limit is None else ("yes" if value <= limit else "NO")
            rows.append((metric, fmt_s(ctl), fmt_s(base), fmt_x(ratio), target, met))

        # 1. first deploy vs bare rsync ------------------------------------------------------
        print(f"1. first deploy to a fresh endpoint vs bare rsync to a fresh dir, same host ({ONE})")
        first_runs: list[Run] = []
        pairs = [("rsync first, cache warm", False, False), ("adapterctl first, cache warm", True, False)]
        if not args.no_drop_caches:
            pairs.append(("page cache dropped before each", False, True))
        why_no_drop = "skipped (--no-drop-caches)" if args.no_drop_caches else None
        for label, ctl_first, cold in pairs:
            b.reset()
            times: dict[str, float] = {}
            for what in ("adapterctl", "rsync") if ctl_first else ("rsync", "adapterctl"):
                if cold and (why_no_drop := drop_caches()) is not None:
                    break
                if what == "rsync":
                    times[what] = b.rsync(f"fresh dir, {label}", [ONE], "bare", fresh=True)
                else:
                    run = b.deploy(f"cycle 1, fresh endpoint, {label}", 1, [ONE])
                    first_runs.append(run)
                    times[what] = run.seconds
            if len(times) == 2:
                row(
                    f"first deploy {mib:.0f} MiB, 1 host, {label}",
                    times["adapterctl"],
                    times["rsync"],
                    "<= 1.15x",
                    1.15,
                )
        if why_no_drop is not None:
            print(f"  no page-cache-dropped pair: {why_no_drop}")

        # bring the other endpoints to cycle 1 as well (not a metric)
        print(f"\n   set-up: cycle 1 to every host ({ONE} already has it)")
        b.deploy("cycle 1 -> 4 hosts (3 fresh)", 1, ALL)

        # baselines for 2 and 3: bare rsync to 1 and 4 fresh dirs, then unchanged ----------------
        print("\n   bare rsync baselines: fresh dirs on 1 host / 4 hosts at once, then again unchanged")
        rs1 = b.rsync(f"fresh dir, 1 host ({ONE})", [ONE], "par", fresh=True)
        rs4 = b.rsync("fresh dirs, 4 hosts in parallel", ALL, "par", fresh=True)
        n = args.noop_runs
        rs_noop1 = statistics.median(b.rsync(f"unchanged, {ONE}", [ONE], "par", False) for _ in range(n))
        rs_noop4 = statistics.median(
            b.rsync("unchanged, 4 hosts in parallel", ALL, "par", False) for _ in range(n)
        )

        # 2. no-change redeploy ------------------------------------------------------------
        print(f"\n2. no-change redeploy (cycle 1 again, already active everywhere; median of {n})")
        noop1 = [b.deploy(f"no change, 1 host ({ONE})", 1, [ONE]) for _ in range(n)]
        noop4 = [b.deploy("no change, 4 hosts", 1, ALL) for _ in range(n)]
        n1 = statistics.median(r.seconds for r in noop1)
        n4 = statistics.median(r.seconds for r in noop4) / len(ALL)
        row("no-change redeploy, 1 host: s per endpoint", n1, rs_noop1, "<= 1 s", 1.0)
        row("no-change redeploy, 4 hosts: s per endpoint", n4, rs_noop4 / len(ALL), "<= 1 s", 1.0)

        # 3. new cycle: 1 host vs 4 hosts -----------------------------------------------------
        print("\n3. first deploy of a new cycle (every adapter regenerated) to 1 host, then to 4 hosts")
        print(f"   regenerated in {b.generate(2):.1f} s")
        new1 = b.deploy(f"cycle 2 -> 1 host ({ONE})", 2, [ONE])
        # what adapterctl's rsync does for a new cycle: the previous release is --link-dest, so
        # rsync also uses it as the delta basis for every changed file
        prev = f"--link-dest={b.bare_dir(ONE, 'par')}"
        delta = b.rsync("new files, --link-dest=previous copy", [ONE], "par2", True, [prev])
        whole = b.rsync("same, --link-dest + --whole-file", [ONE], "par2", True, [prev, "--whole-file"])
        print(f"   regenerated in {b.generate(3):.1f} s")
        new4 = b.deploy("cycle 3 -> 4 hosts, --parallel 4", 3, ALL)
        row("new cycle, 1 host (baseline: fresh dir)", new1.seconds, rs1)
        row("new cycle, 4 hosts --parallel 4 (fresh dirs)", new4.seconds, rs4)
        r_ctl, r_rs = new4.seconds / new1.seconds, rs4 / rs1
        rows.append(
            ("  4 hosts / 1 host", fmt_x(r_ctl), fmt_x(r_rs), "", "<= 1.3x", "yes" if r_ctl <= 1.3 else "NO")
        )

        # where the time went --------------------------------------------------------------
        if first_runs:
            print_timeline(first_runs[0], f"where the first deploy's {first_runs[0].seconds:.2f} s went")
            print_breakdown(first_runs[0], "first deploy, 1 host")
        print_breakdown(noop1[-1], "no-change redeploy, 1 host")
        print_breakdown(noop4[-1], "no-change redeploy, 4 hosts")
        print_breakdown(new1, "new cycle, 1 host")
        print_breakdown(new4, "new cycle, 4 hosts")
        print(
            f"\nbare rsync of new weights next to the previous copy: {delta:.2f} s with --link-dest (delta "
            f"against the old file), {whole:.2f} s with --whole-file, {rs1:.2f} s into a fresh dir"
        )

        # the table ------------------------------------------------------------------------
        print(f"\nbaseline: bare `rsync -a -e 'ssh -F cfg'` of the same {len(b.models)} adapter dirs")
        head = ("metric", "adapterctl", "baseline", "ratio", "target", "met")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for r in [head, *rows]:
            cells = [
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ]
            print("  ".join(cells))
        print(
            f"\nnote: the {len(ALL)} hosts are sshd processes on this one machine ({os.cpu_count()} cores, "
            "one disk): with 4 hosts, 4 ssh+rsync pipelines and their remote hashing compete for the same "
            "CPUs and disk, so '4 hosts / 1 host' here is a worst case, not what 4 real machines would see."
        )
        print("note: single runs (medians for no-change); other work on this machine adds noise, see load.")
        if why_no_drop is not None:
            print(f"note: page cache not dropped: {why_no_drop}")
        for fact in machine_facts():
            print(f"machine: {fact}")
        print(f"machine: load average at start {load0}, at end {load_avg()}")
        left = sorted(os.listdir(b.cli_tmp))
        if left:
            print(f"note: adapterctl left {len(left)} entries in its TMPDIR: {', '.join(left[:5])}")
        if b.failures:
            print("FAILURES: " + "; ".join(b.failures))
    finally:
        if hosts is not None:
            hosts.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"total {time.perf_counter() - started:.0f} s (hosts stopped, {tmp} removed)")


if __name__ == "__main__":
    main()
