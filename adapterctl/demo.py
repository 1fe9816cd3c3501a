"""`adapterctl demo`: the whole pipeline on one machine, with real files, processes and signals.

It writes a throwaway workspace (two local endpoints, an adapter store, PEFT-shaped adapters
with real safetensors files), starts a serving stand-in that reloads on SIGUSR1, then runs
the real CLI for each step and checks each exit code. The health engine is a stand-in
translator (adapterctl.demo_translator) until the tiny real model arrives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from adapterctl.errors import UsageError

MODEL = "gemma_demo"


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


def write_workspace(ws: Path) -> Path:
    """Create the demo config and directories in `ws`; returns the config path."""
    (ws / "endpoints" / "mac-demo" / "run").mkdir(parents=True)
    (ws / "endpoints" / "rtx-demo").mkdir(parents=True)
    (ws / "training" / MODEL).mkdir(parents=True)
    py = json.dumps(sys.executable)
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
    reload_method: sigusr1          # the serving stand-in reloads on SIGUSR1 and writes loaded.json
    pidfile: ../run/serve.pid       # relative to adapter_dir
    reload_timeout_s: 10
    compat_links:
      fine_tuned_gemma_demo: {MODEL}
  rtx-demo:
    host: local
    adapter_dir: ./endpoints/rtx-demo/adapters
    kind: gguf
    reload_method: none
models:
  {MODEL}:
    source: ./training/{MODEL}       # the newest run directory under here is deployed
    base_model: local/tiny-llama
    health:
      suite: translation_en_es
      engine: command
      command: [{py}, -m, adapterctl.demo_translator, "{{release}}"]
      timeout_s: 30
""")
    return cfg


def stop_process(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    """SIGTERM a process we started, SIGKILL it if it lingers, and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_serving_standin(
    adapter_dir: Path, model: str, run_dir: Path, timeout_s: float = 15
) -> subprocess.Popen:
    """Start `python -m adapterctl.serving` for one model, pidfile + loaded.json + log in run_dir.

    Returns once it reported its first load. Raises UsageError if it does not come up.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "adapterctl.serving",
            "--adapter-dir",
            str(adapter_dir),
            "--model",
            model,
            "--pidfile",
            str(run_dir / "serve.pid"),
            "--log",
            str(run_dir / "serve.log"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while not (run_dir / "loaded.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise UsageError(f"the serving stand-in did not start (see {run_dir / 'serve.log'})")
        time.sleep(0.05)
    return proc


def run_demo(directory: Path | None, out, err) -> int:
    """Run the demo; returns 0 when every step behaved as expected, else 1."""
    if directory is None:
        ws = Path(tempfile.mkdtemp(prefix="adapterctl-demo-"))
    else:
        ws = directory.resolve()
        if ws.exists() and any(ws.iterdir()):
            raise UsageError(f"{ws} is not empty", "give a new or empty directory, or none for a temp dir")
        ws.mkdir(parents=True, exist_ok=True)
    cfg = write_workspace(ws)
    env = dict(os.environ, ADAPTERCTL_CONFIG=str(cfg), COLUMNS=os.environ.get("COLUMNS", "160"))
    out.print(f"demo workspace: {ws}")
    out.print(f"  config: {cfg}  (try: ADAPTERCTL_CONFIG={cfg} adapterctl status)")
    train = ws / "training" / MODEL
    server = start_serving_standin(
        ws / "endpoints" / "mac-demo" / "adapters", MODEL, ws / "endpoints" / "mac-demo" / "run"
    )
    out.print(f"  serving stand-in for mac-demo running as pid {server.pid} (reloads on SIGUSR1)\n")
    failures = []

    def step(title: str, args: list[str], expect: int) -> None:
        out.print(f"==> {title}")
        out.print(f"$ adapterctl {' '.join(args)}", markup=False)
        proc = subprocess.run(
            [sys.executable, "-m", "adapterctl", *args], env=env, cwd=ws, capture_output=True, text=True
        )
        for line in (proc.stderr + proc.stdout).rstrip().splitlines():
            out.print("  " + line, markup=False)
        verdict = "as expected" if proc.returncode == expect else f"UNEXPECTED (wanted {expect})"
        out.print(f"  exit {proc.returncode} — {verdict}\n")
        if proc.returncode != expect:
            failures.append(title)

    both = ["--endpoints", "mac-demo", "rtx-demo"]
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
        time.sleep(1.1)  # a newer mtime marks run2 as the newest training output
        make_adapter(train / "run2", seed=2, metrics={"final_loss": 0.58, "epochs": 3})
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
        time.sleep(1.1)
        make_adapter(train / "run3", seed=3, zero_b=True, metrics={"final_loss": 2.7, "epochs": 1})
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
    if failures:
        err.print(f"demo: {len(failures)} step(s) did not behave as expected: {'; '.join(failures)}")
        return 1
    out.print(f"demo finished: every step behaved as expected. Workspace kept at {ws}")
    return 0
