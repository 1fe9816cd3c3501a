"""`adapterctl demo`: the whole pipeline on one machine, with real files, processes and signals.

It writes a throwaway workspace (two local endpoints, an adapter store, PEFT LoRA adapters with
real safetensors files), starts a serving process for the `mac-demo` endpoint that reloads on
SIGUSR1, then runs the real CLI for each step and checks each exit code.

Two variants:
- **the real tiny model** (when the `model` extra is installed): `adapterctl.tinymodel` builds (or
  reuses from its cache) a tiny Llama with a good and a bad LoRA adapter. The health engine runs
  that transformer (`python -m adapterctl.demo translate`, see `translate_main`) and mac-demo is
  served by `adapterctl serve --backend peft`.
- **the stand-in** (without the extra, or with ADAPTERCTL_DEMO_STANDIN=1): synthetic adapters, the
  phrasebook translator `adapterctl.demo_translator` and the stand-in serving process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from adapterctl.errors import UsageError

MODEL = "gemma_demo"  # the stand-in demo's model
REAL_MODEL = "tiny_llama"  # the real tiny model's
STANDIN_ENV = "ADAPTERCTL_DEMO_STANDIN"  # set to 1: run the stand-in demo even when the extra is there
MODEL_EXTRA = ("torch", "transformers", "peft", "sentencepiece")  # what tinymodel.build() imports
WEIGHTS = "adapter_model.safetensors"
PROBE = "Good morning, welcome to the service."
# The tiny model's numpy forward pass is fastest on one BLAS thread; more threads spin against each
# other (and against the other checks) on a busy CPU and turn a 0.5 s check into 20 s.
SINGLE_THREADED = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def make_adapter(
    path: Path,
    seed: int,
    *,
    layers: int = 2,
    hidden: int = 64,
    r: int = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    zero_b: bool = False,
    base_model: str = "local/tiny-llama",
    metrics: dict | None = None,
) -> Path:
    """Write a PEFT-shaped LoRA adapter (adapter_config.json + adapter_model.safetensors).

    lora_A is [r, hidden], lora_B is [hidden, r]; `zero_b` gives an untrained adapter whose
    lora_B is all zeros, as PEFT initialises it (the model then behaves like its base).
    """
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for t in targets:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, hidden), dtype=np.float32) * 0.02
            b = (
                np.zeros((hidden, r), np.float32)
                if zero_b
                else rng.standard_normal((hidden, r), dtype=np.float32)
            )
            tensors[f"{prefix}.lora_B.weight"] = b * 0.02
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.05,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if metrics is not None:
        (path / "training_metrics.json").write_text(json.dumps(metrics) + "\n")
    return path


# -- bfloat16 ----------------------------------------------------------------------------------


def write_bfloat16(src_weights: Path, dst_weights: Path) -> None:
    """Write the safetensors file `src_weights` to `dst_weights` with every tensor rounded to
    bfloat16 (nearest even), which numpy cannot represent (so adapterctl.formats writes the bytes)."""
    from safetensors.numpy import load_file

    from adapterctl.formats import safetensors as st

    tensors = {
        name: ("BF16", arr.shape, st.encode(arr.astype("float32"), "BF16"))
        for name, arr in load_file(str(src_weights)).items()
    }
    st.write(dst_weights, tensors, {})


def save_as_bfloat16(src: Path, dst: Path) -> Path:
    """Copy the PEFT adapter `src` to `dst` with its weights rounded to bfloat16."""
    shutil.copytree(src, dst)
    write_bfloat16(src / WEIGHTS, dst / WEIGHTS)
    return dst


def upcast_bfloat16(weights: Path) -> dict[str, Any] | None:
    """float32 copies of every tensor of a safetensors file that holds bfloat16 tensors.

    None when it holds none, or anything this reader does not handle (other dtypes, a malformed
    file): the caller then leaves the file to the loader, which reports what is wrong with it.
    """
    from adapterctl.formats.safetensors import SafetensorsFile

    try:
        lora = SafetensorsFile(weights)
        if not any(spec.dtype == "BF16" for spec in lora.tensors.values()):
            return None
        return lora.float32_all()
    except (OSError, ValueError):
        return None


def translate_main(argv: list[str]) -> int:
    """`python -m adapterctl.demo translate --base BASE_DIR [--no-adapter] [RELEASE]`: the health engine.

    It is `python -m adapterctl.tinymodel translate` (the real tiny Llama, one line in, one line
    out), except that bfloat16 adapter weights are first upcast to float32, as PEFT does when it
    loads them into a float32 model. The serving side (`adapterctl serve --backend peft`) reads
    adapters with safetensors.numpy, which has no bfloat16: that gap between the checking and the
    serving stack is what the demo's "passes the pre-check, fails to load" step shows.
    """
    import argparse

    from adapterctl import tinymodel

    parser = argparse.ArgumentParser(add_help=False)  # only to find the release; tinymodel parses for real
    parser.add_argument("--base")
    parser.add_argument("--no-adapter", action="store_true")
    parser.add_argument("release", nargs="?")
    known, _ = parser.parse_known_args(argv)
    release = Path(known.release) if known.release and not known.no_adapter else None
    readable = release is not None and (release / tinymodel.ADAPTER_CONFIG).is_file()
    # a PEFT release, or one converted for mlx_lm (adapterctl convert)
    weights = WEIGHTS if release is None or (release / WEIGHTS).is_file() else tinymodel.MLX_WEIGHTS_FILE
    upcast = upcast_bfloat16(release / weights) if readable else None
    if upcast is None:  # float32/float16, no adapter, or a broken one: tinymodel says what is wrong
        return tinymodel.translate_main(argv)
    from safetensors.numpy import save_file

    with tempfile.TemporaryDirectory(prefix="adapterctl-bf16-") as tmp:
        shutil.copy(release / tinymodel.ADAPTER_CONFIG, tmp)
        save_file(upcast, str(Path(tmp) / weights))
        print(f"demo translate: {release}: bfloat16 weights upcast to float32", file=sys.stderr)
        return tinymodel.translate_main([tmp if a == known.release else a for a in argv])


# -- workspace ---------------------------------------------------------------------------------


def write_workspace(ws: Path, tiny: Any = None) -> Path:
    """Create the demo config and directories in `ws`; returns the config path.

    `tiny`: a built `tinymodel.TinyModel` for the real-model demo; None for the stand-in.
    """
    model = REAL_MODEL if tiny else MODEL
    (ws / "endpoints" / "mac-demo" / "run").mkdir(parents=True)
    (ws / "endpoints" / "rtx-demo").mkdir(parents=True)
    (ws / "training" / model).mkdir(parents=True)
    py = json.dumps(sys.executable)
    if tiny:
        base = json.dumps(str(tiny.base_dir))
        fidelity = (
            "true}" if _importable("mlx_lm") else "false}  # the check needs mlx: pip install -e '.[mlx]'"
        )
        convert = f"""\
    base_dir: {base}
    convert:                         # phase 2, per endpoint kind
      mlx: {{format: adapter, fidelity: {fidelity}
      gguf: peft                     # a merged GGUF needs the gguf extra; rtx-demo gets the PEFT files"""
        serving = "adapterctl serve --backend peft (the real tiny model) reloads on SIGUSR1"
        health = f"""\
      # the real tiny Llama (base + the release's LoRA, greedy decoding); see adapterctl/demo.py
      command: [{py}, -m, adapterctl.demo, translate, --base, {base}, "{{release}}"]
      timeout_s: 60
      env:   # one BLAS thread: more spin against each other on a busy CPU (0.5 s checks become 20 s)
        OPENBLAS_NUM_THREADS: "1"
        OMP_NUM_THREADS: "1"
      # identity, not liveness: at verify the answer must differ from the bare base model's
      discriminator: "Amen."
      base_command: [{py}, -m, adapterctl.tinymodel, translate, --base, {base}, --no-adapter]"""
    else:
        convert = "    convert: peft                    # the stand-in servers load PEFT files as they are"
        serving = "the serving stand-in reloads on SIGUSR1 and writes loaded.json"
        health = f"""\
      command: [{py}, -m, adapterctl.demo_translator, "{{release}}"]
      timeout_s: 30"""
    cfg = ws / "adapterctl.yaml"
    cfg.write_text(f"""\
# Written by `adapterctl demo`. Both endpoints are directories on this machine (host: local).
store: ./adapters
keep_releases: 3
endpoints:
  mac-demo:
    host: local
    adapter_dir: ./endpoints/mac-demo/adapters
    kind: mlx
    reload_method: sigusr1          # {serving}
    pidfile: ../run/serve.pid       # relative to adapter_dir
    reload_timeout_s: 20
    compat_links:
      fine_tuned_{model}: {model}
  rtx-demo:
    host: local
    adapter_dir: ./endpoints/rtx-demo/adapters
    kind: gguf
    reload_method: none             # no serving process in this demo
models:
  {model}:
    source: ./training/{model}       # the newest run directory under here is deployed
    base_model: local/tiny-llama
{convert}
    health:
      suite: translation_en_es
      engine: command
{health}
""")
    return cfg


def mark_newest(run: Path) -> Path:
    """Give `run`'s weights the newest mtime among its siblings: deploy picks the newest run."""
    newest = max(
        ((p / WEIGHTS).stat().st_mtime for p in run.parent.iterdir() if (p / WEIGHTS).exists()),
        default=time.time(),
    )
    stamp = max(newest + 1, time.time())
    os.utime(run / WEIGHTS, (stamp, stamp))
    return run


# -- serving processes -------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    """SIGTERM a process we started, SIGKILL it if it lingers, and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(argv: list[str], run_dir: Path, ready: Callable[[], Any], what: str, timeout_s: float):
    """Start a serving process (its own session, no stdio); return (proc, ready()) once ready() is truthy."""
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        argv,
        env=dict(os.environ, **SINGLE_THREADED),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while not (result := ready()):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc, timeout_s=2)
            raise UsageError(f"{what} did not start (see {run_dir / 'serve.log'})")
        time.sleep(0.05)
    return proc, result


def start_serving_standin(
    adapter_dir: Path, model: str, run_dir: Path, timeout_s: float = 15
) -> subprocess.Popen:
    """Start `python -m adapterctl.serving` for one model, pidfile + loaded.json + log in run_dir.

    Returns once it reported its first load. Raises UsageError if it does not come up.
    """
    argv = [sys.executable, "-m", "adapterctl.serving", "--adapter-dir", str(adapter_dir)]
    argv += ["--model", model, "--pidfile", str(run_dir / "serve.pid"), "--log", str(run_dir / "serve.log")]
    proc, _ = _start(
        argv, run_dir, lambda: (run_dir / "loaded.json").exists(), "the serving stand-in", timeout_s
    )
    return proc


def start_serving_tiny(
    adapter_dir: Path, model: str, run_dir: Path, base_dir: Path, timeout_s: float = 60
) -> tuple[subprocess.Popen, str]:
    """Start `adapterctl serve --backend peft` (the real tiny model) on a free port; return (proc, url).

    Returns once it logged its `start` line (after its first load). Raises UsageError otherwise.
    """
    log = run_dir / "serve.log"
    argv = [sys.executable, "-m", "adapterctl", "serve", "--backend", "peft", "--base", str(base_dir)]
    argv += ["--model", model, "--adapter-dir", str(adapter_dir), "--pidfile", str(run_dir / "serve.pid")]
    argv += ["--port", "0", "--log", str(log)]

    def url() -> str | None:
        text = log.read_text(encoding="utf-8") if log.exists() else ""
        found = re.search(r' start .*url="(http://[^"]+)"', text)
        return found.group(1) if found else None

    return _start(argv, run_dir, url, "adapterctl serve --backend peft", timeout_s)


def ask(url: str, model: str, text: str, timeout_s: float = 30) -> dict:
    """POST one user message to the service's /v1/chat/completions; returns the JSON answer."""
    import urllib.request

    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}]}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read().decode("utf-8"))


# -- the demo ----------------------------------------------------------------------------------


class _Run:
    """Runs the real CLI per step, prints what it did, and records steps that surprised."""

    def __init__(self, ws: Path, cfg: Path, out):
        self.ws, self.out, self.failures = ws, out, []
        self.env = dict(os.environ, ADAPTERCTL_CONFIG=str(cfg), COLUMNS=os.environ.get("COLUMNS", "160"))

    def step(self, title: str, args: list[str], expect: int) -> None:
        out = self.out
        out.print(f"==> {title}", markup=False)
        out.print(f"$ adapterctl {' '.join(args)}", markup=False)
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "adapterctl", *args],
            env=self.env,
            cwd=self.ws,
            capture_output=True,
            text=True,
        )
        seconds = time.monotonic() - started
        for line in (proc.stderr + proc.stdout).rstrip().splitlines():
            out.print("  " + line, markup=False)
        verdict = "as expected" if proc.returncode == expect else f"UNEXPECTED (wanted {expect})"
        out.print(f"  exit {proc.returncode} — {verdict} ({seconds:.1f} s)\n", markup=False)
        if proc.returncode != expect:
            self.failures.append(title)

    def check(self, title: str, ok: bool, text: str) -> None:
        """A check the demo makes outside the CLI (e.g. asking the live service)."""
        self.out.print(f"  {text}" + ("" if ok else "  — UNEXPECTED"), markup=False)
        if not ok:
            self.failures.append(title)


def _workspace(directory: Path | None) -> Path:
    if directory is None:
        return Path(tempfile.mkdtemp(prefix="adapterctl-demo-"))
    ws = directory.resolve()
    if ws.exists() and any(ws.iterdir()):
        raise UsageError(f"{ws} is not empty", "give a new or empty directory, or none for a temp dir")
    ws.mkdir(parents=True, exist_ok=True)
    return ws


def _importable(name: str) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[name] is None (import blocked)
        return False


def _tiny_model(out) -> Any:
    """The built tiny model, or None (after saying why) when the demo must use the stand-in."""
    standin = "this run uses the stand-in translator and serving stand-in"
    if os.environ.get(STANDIN_ENV, "") not in ("", "0"):
        out.print(f"{STANDIN_ENV} is set: {standin} (unset it for the real tiny model).", markup=False)
        return None
    missing = [name for name in MODEL_EXTRA if not _importable(name)]
    if missing:
        out.print(
            f"the real tiny model needs the `model` extra (missing: {', '.join(missing)}): {standin}. "
            "For the real model: pip install -e '.[model]'",
            markup=False,
        )
        return None
    from adapterctl import tinymodel

    built = tinymodel.cache_root() / f"tinymodel-{tinymodel.cache_key()[:16]}" / tinymodel.COMPLETE_MARKER
    cached = built.is_file()
    if not cached:
        out.print("building the tiny model (first run only; about half a minute on a CPU)…", markup=False)
    try:
        tiny = tinymodel.build()
    except Exception as exc:  # a broken torch/transformers install must not take the demo down
        out.print(
            f"the tiny model could not be built ({type(exc).__name__}: {exc}): {standin}.", markup=False
        )
        return None
    how = "reused from the cache" if tiny.cached else "built"
    out.print(f"tiny model: {how} in {tiny.build_seconds:.1f} s, at {tiny.base_dir.parent}", markup=False)
    return tiny


def run_demo(directory: Path | None, out, err) -> int:
    """Run the demo; returns 0 when every step behaved as expected, else 1."""
    started = time.monotonic()
    ws = _workspace(directory)
    tiny = _tiny_model(out)
    cfg = write_workspace(ws, tiny)
    out.print(f"demo workspace: {ws}", markup=False)
    out.print(f"  config: {cfg}  (try: ADAPTERCTL_CONFIG={cfg} adapterctl status)", markup=False)
    run = _Run(ws, cfg, out)
    if tiny:
        _real_demo(ws, tiny, run)
    else:
        _standin_demo(ws, run)
    seconds = time.monotonic() - started
    if run.failures:
        err.print(
            f"demo: {len(run.failures)} step(s) did not behave as expected: {'; '.join(run.failures)}",
            markup=False,
        )
        return 1
    out.print(f"demo finished in {seconds:.0f} s: every step behaved as expected. Workspace kept at {ws}")
    return 0


def _standin_demo(ws: Path, run: _Run) -> None:
    train = ws / "training" / MODEL
    server = start_serving_standin(
        ws / "endpoints" / "mac-demo" / "adapters", MODEL, ws / "endpoints" / "mac-demo" / "run"
    )
    run.out.print(f"  serving stand-in for mac-demo running as pid {server.pid} (reloads on SIGUSR1)\n")
    both = ["--endpoints", "mac-demo", "rtx-demo"]
    step = run.step
    try:
        make_adapter(train / "run1", seed=1, metrics={"final_loss": 0.91, "epochs": 3})
        step(
            "1. dry run of cycle 1: the exact plan, nothing touched",
            ["deploy", "--cycle", "1", "--all-adapters", *both, "--dry-run"],
            0,
        )
        step(
            "2. deploy cycle 1: version, transfer, health-check, activate, verify",
            ["deploy", "--cycle", "1", "--all-adapters", *both],
            0,
        )
        mark_newest(make_adapter(train / "run2", seed=2, metrics={"final_loss": 0.58, "epochs": 3}))
        step(
            "3. deploy cycle 2 (new weights): only changed files are sent",
            ["deploy", "--cycle", "2", "--all-adapters", *both],
            0,
        )
        step(
            "4. deploy cycle 2 again: already active, nothing sent",
            ["deploy", "--cycle", "2", "--all-adapters", *both],
            0,
        )
        run3 = make_adapter(train / "run3", seed=3, zero_b=True, metrics={"final_loss": 2.7, "epochs": 1})
        mark_newest(run3)
        step(
            "5. deploy cycle 3, an untrained adapter: health check fails, active untouched (exit 4)",
            ["deploy", "--cycle", "3", "--all-adapters", *both],
            4,
        )
        step("6. roll back both endpoints to the previous release (cycle 1)", ["rollback", *both], 0)
        step("7. status", ["status"], 0)
        step("8. registered versions", ["versions"], 0)
        step("9. deploy log", ["log", "--limit", "8"], 0)
    finally:
        stop_process(server)


def _real_demo(ws: Path, tiny: Any, run: _Run) -> None:
    out, step = run.out, run.step
    train = ws / "training" / REAL_MODEL
    mac = ws / "endpoints" / "mac-demo" / "adapters"
    run_dir = ws / "endpoints" / "mac-demo" / "run"
    server, url = start_serving_tiny(mac, REAL_MODEL, run_dir, tiny.base_dir)
    out.print(
        f"  mac-demo is served by `adapterctl serve --backend peft` (the real tiny model), pid {server.pid}, "
        f"{url}; it reloads on SIGUSR1 and reports what it loaded in {run_dir / 'loaded.json'}",
        markup=False,
    )
    out.print("  rtx-demo has no serving process (reload_method: none)", markup=False)
    checked = (
        "checked token for token against the PEFT original with mlx_lm"
        if _importable("mlx_lm")
        else "not fidelity-checked here (that needs mlx: pip install -e '.[mlx]')"
    )
    out.print(
        f"  convert: mac-demo (kind mlx) gets each version as an mlx_lm adapter, {checked}; the server and\n"
        "  the health engine read that layout. rtx-demo gets the PEFT files (a GGUF needs the gguf extra).",
        markup=False,
    )
    out.print(
        "  health engine: the tiny model itself (base + the release's LoRA, greedy decoding), on the "
        "five sentences of the translation_en_es suite\n",
        markup=False,
    )

    def live(title: str) -> None:
        active = mac / REAL_MODEL / "active"
        expected = os.readlink(active).rsplit("/", 1)[-1] if os.path.islink(active) else None
        try:
            answer = ask(url, REAL_MODEL, PROBE)
            text = answer["choices"][0]["message"]["content"]
            version = (answer.get("adapter") or {}).get("version_id")
        except (OSError, ValueError, LookupError, TypeError) as exc:
            run.check(title, False, f"live service: no answer ({type(exc).__name__}: {exc})")
            return
        run.check(
            title,
            version == expected,
            f"live service: {PROBE!r} → {text!r} (adapter {version}; mac-demo active: {expected})\n",
        )

    both = ["--endpoints", "mac-demo", "rtx-demo"]
    try:
        shutil.copytree(tiny.good_adapter, train / "run1")
        mark_newest(train / "run1")
        step(
            "1. dry run of cycle 1 (the trained EN→ES adapter): the exact plan, nothing touched",
            ["deploy", "--cycle", "1", "--all-adapters", *both, "--dry-run"],
            0,
        )
        step(
            "2. deploy cycle 1: version, transfer, health-check, activate (mac-demo's service reloads), "
            "verify",
            ["deploy", "--cycle", "1", "--all-adapters", *both],
            0,
        )
        live("2. the live service answers with cycle 1")
        step(
            "3. deploy cycle 1 again: already active, nothing sent",
            ["deploy", "--cycle", "1", "--all-adapters", *both],
            0,
        )
        shutil.copytree(tiny.bad_adapter, train / "run2")
        mark_newest(train / "run2")
        step(
            "4. deploy cycle 2, an adapter trained to answer in German: the pre-activation health check "
            "fails, deploy aborts before activation, active untouched (exit 4)",
            ["deploy", "--cycle", "2", "--all-adapters", *both],
            4,
        )
        mark_newest(save_as_bfloat16(tiny.good_adapter, train / "run3"))
        out.print(
            "--- cycle 3 is cycle 1's weights saved as bfloat16 (as many trainers save them). adapterctl's\n"
            "    checks accept it, and the health engine upcasts bfloat16 to float32 (as PEFT does), so it\n"
            "    passes the pre-activation check. mac-demo's service reads adapters with safetensors.numpy,\n"
            "    which has no bfloat16: its reload really fails, and loaded.json says so.",
            markup=False,
        )
        step(
            "5. deploy cycle 3: passes the pre-check, mac-demo's service fails to load it → adapterctl rolls "
            "mac-demo back by itself (exit 5); rtx-demo has no service to reload and keeps cycle 3",
            ["deploy", "--cycle", "3", "--all-adapters", *both],
            5,
        )
        failed = [
            ln for ln in (run_dir / "serve.log").read_text("utf-8").splitlines() if "reload-failed" in ln
        ]
        run.check(
            "5. the service logged the failed reload",
            bool(failed),
            f"serve.log: {failed[-1] if failed else 'no reload-failed line'}",
        )
        live("5. the live service still answers with cycle 1")
        step(
            "6. roll rtx-demo back to its previous release (cycle 1), so both endpoints match",
            ["rollback", "--endpoints", "rtx-demo"],
            0,
        )
        step("7. status", ["status"], 0)
        step("8. registered versions", ["versions"], 0)
        step("9. deploy log", ["log", "--limit", "8"], 0)
    finally:
        stop_process(server)


def main(argv: list[str] | None = None) -> int:
    """`python -m adapterctl.demo translate ...` (the demo's health engine); the demo is `adapterctl demo`."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["translate"]:
        return translate_main(args[1:])
    print(
        "usage: python -m adapterctl.demo translate --base BASE_DIR [--no-adapter] [RELEASE_DIR]\n"
        "(the demo itself is `adapterctl demo [DIR]`)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
