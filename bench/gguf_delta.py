"""A new cycle's merged GGUF over SSH: does adapterctl send only what changed?

A merged GGUF (base + LoRA, Q4_K_M) of a new training cycle differs from the previous one only in
the tensors the LoRA touches (q_proj/v_proj here); adapterctl ships it with rsync's delta
algorithm against the previous release (`--link-dest=<previous release> --no-whole-file`). For
two models built here from code (nothing is downloaded):

  tiny       adapterctl.tinymodel: hidden 256, 2 layers; cycle 1 = its good adapter, cycle 2 = its
             bad adapter (another real LoRA of the same shape)
  synthetic  a random Llama (--hidden, --layers, intermediate ~2.75 x hidden, the tiny model's
             512-piece tokenizer, bf16), two random PEFT LoRAs r=8 on q_proj/v_proj (lora_B != 0)

it starts one real sshd host on loopback (tests/sshhosts.py), deploys cycle 1 then cycle 2 with
the adapterctl CLI (one gguf endpoint, format merged, fidelity off, no health suite), and reads
the cycle-2 deploy's bytes_sent from store/deploy_log.jsonl. On the same two model.gguf files it
measures, over the same ssh: a full copy (`rsync --whole-file` into an empty dir), a bare rsync
delta (`rsync --no-whole-file` onto a copy of the old file), adapterctl's own rsync options by
hand (new staging dir, `--link-dest` = the old file's dir), each with `--stats` "Total bytes
sent"; and changed_tensor_bytes(old, new), the data bytes of the tensors whose bytes differ.
Target: adapterctl bytes sent <= 1.2 x changed tensor bytes. Nothing is asserted.

Run: python bench/gguf_delta.py [--hidden 1024] [--layers 8] [--models tiny,synthetic] [--lora-scale 1]
     [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import load_sshhosts  # noqa: E402

from adapterctl import tinymodel  # noqa: E402
from adapterctl.endpoint_ops import PARTIAL_DIR  # noqa: E402
from adapterctl.formats import gguf as gguf_format  # noqa: E402

HOST = "gguf-1"
TARGET_RATIO = 1.2
QUANT = "Q4_K_M"
CLI_TIMEOUT_S = 1800
RSYNC_TIMEOUT_S = 600
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
_BYTES_SENT = re.compile(r"Total bytes sent:\s*([\d,.]+)")
_LITERAL = re.compile(r"Literal data:\s*([\d,.]+)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- models -----------------------------------------------------------------------------------------
@dataclass
class Parts:
    """A base model directory and the two cycles' PEFT adapters."""

    name: str
    base_dir: Path
    cycles: tuple[Path, Path]
    shape: str
    seconds: float


def tiny_parts() -> Parts:
    t0 = time.perf_counter()
    tiny = tinymodel.build()
    shape = f"hidden {tinymodel.HIDDEN}, {tinymodel.LAYERS} layers, LoRA r={tinymodel.LORA_R} (trained)"
    return Parts(
        "tiny", tiny.base_dir, (tiny.good_adapter, tiny.bad_adapter), shape, time.perf_counter() - t0
    )


def synthetic_parts(root: Path, hidden: int, layers: int, rank: int, lora_scale: float) -> Parts:
    """A random bf16 Llama with the tiny tokenizer and two random LoRAs on q_proj/v_proj (lora_B
    scaled by `lora_scale`)."""
    import copy
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    t0 = time.perf_counter()
    tiny = tinymodel.build()
    base_dir = root / "base"
    heads = max(1, hidden // 64)
    # ~2.75 x hidden, a multiple of 256 so every row fits the k-quant blocks (no fallback types)
    intermediate = max(256, round(hidden * 2.75 / 256) * 256)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tinymodel.VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    hf_logging.disable_progress_bar()
    cycles = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notes from inside peft
        model.to(torch.bfloat16).save_pretrained(str(base_dir))
        model.to(torch.float32)
        for cycle in (1, 2):
            torch.manual_seed(1000 + cycle)
            lora = LoraConfig(
                r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False
            )
            out = root / f"cycle{cycle}"
            peft_model = get_peft_model(copy.deepcopy(model), lora)
            with torch.no_grad():
                for name, param in peft_model.named_parameters():
                    if ".lora_B." in name:
                        param.mul_(lora_scale)
            peft_model.save_pretrained(str(out))
            (out / "README.md").unlink(missing_ok=True)
            cycles.append(out)
    for f in tiny.base_dir.iterdir():  # the converter needs a tokenizer; the tiny one fits vocab 512
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, base_dir / f.name)
    shape = f"hidden {hidden}, {layers} layers, intermediate {intermediate}, LoRA r={rank} (random"
    shape += f", lora_B x {lora_scale:g})" if lora_scale != 1 else ")"
    return Parts("synthetic", base_dir, (cycles[0], cycles[1]), shape, time.perf_counter() - t0)


# -- one model: deploy two cycles, then the bare rsync baselines ------------------------------------
@dataclass
class Result:
    model: str
    shape: str
    file_bytes: int = 0
    changed_tensor_bytes: int = 0
    changed_tensors: int = 0
    changed_names: list[str] = field(default_factory=list)
    tensors: int = 0
    adapterctl_cycle1_bytes_sent: int = 0
    adapterctl_bytes_sent: int = 0
    ratio: float | None = None
    bare_delta_bytes: int = 0
    bare_delta_literal: int = 0
    linkdest_bytes: int = 0
    full_copy_bytes: int = 0
    deploy_seconds: list[float] = field(default_factory=list)
    convert_seconds: list[float | None] = field(default_factory=list)
    convert: list[str | None] = field(default_factory=list)
    bare_delta_seconds: float = 0.0
    linkdest_seconds: float = 0.0
    full_copy_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def _count(pattern: re.Pattern, text: str) -> int:
    m = pattern.search(text)
    return int(m.group(1).replace(",", "").replace(".", "")) if m else -1


class ModelBench:
    def __init__(self, tmp: Path, hosts, parts: Parts):
        self.parts, self.hosts = parts, hosts
        self.ws = tmp / "ws"
        self.host = hosts.hosts[HOST]
        self.config = self.ws / "adapterctl.yaml"
        cli_tmp = tmp / "cli-tmp"  # the CLI's ControlMaster sockets go under ours
        cli_tmp.mkdir(parents=True, exist_ok=True)
        self.env = dict(hosts.env(), ADAPTERCTL_CONFIG=str(self.config), TMPDIR=str(cli_tmp))
        # hosts.env() moves $HOME: keep finding llama.cpp's converters where this user has them
        self.env["ADAPTERCTL_CACHE"] = str(tinymodel.cache_root())
        self.ssh_e = f"ssh -F {hosts.ssh_config}"

    def write_config(self) -> None:
        m = self.parts.name
        self.ws.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f"""\
store: ./store
keep_releases: 5
endpoints:
  {HOST}:
    host: {HOST}
    adapter_dir: "{self.host.adapter_dir}"
    kind: gguf
    reload_method: none
models:
  {m}:
    source: ./training/{m}
    base_model: bench/{m}
    base_dir: "{self.parts.base_dir}"
    convert:
      gguf: {{format: merged, quant: {QUANT}, fidelity: false}}
"""
        )

    def deploy(self, cycle: int, res: Result) -> dict:
        """Put the cycle's adapter in the source dir, run `adapterctl deploy --cycle N`; returns the
        deploy log's line for this endpoint and model."""
        src = self.ws / "training" / self.parts.name
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        for name in ADAPTER_FILES:
            shutil.copy2(self.parts.cycles[cycle - 1] / name, src / name)
        argv = [sys.executable, "-m", "adapterctl", "--ssh-config", str(self.hosts.ssh_config), "deploy"]
        argv += ["--cycle", str(cycle), "--all-adapters", "--endpoints", HOST, "--json"]
        t0 = time.perf_counter()
        proc = subprocess.run(
            argv,
            cwd=self.ws,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )
        seconds = time.perf_counter() - t0
        res.deploy_seconds.append(round(seconds, 2))
        deploy_log = self.ws / "store" / "deploy_log.jsonl"
        lines = deploy_log.read_text().splitlines() if deploy_log.exists() else []
        entry = json.loads(lines[-1]) if lines else {}
        log(
            f"  [{self.parts.name}] adapterctl deploy --cycle {cycle}: exit {proc.returncode}, "
            f"{seconds:.1f} s, bytes_sent {entry.get('bytes_sent')}, convert {entry.get('convert')}"
        )
        if proc.returncode != 0 or entry.get("status") != "success":
            tail = " | ".join(ln for ln in proc.stderr.strip().splitlines()[-8:])
            res.errors.append(f"deploy --cycle {cycle}: exit {proc.returncode}: {tail}")
            log(f"    stderr: {tail}")
        return entry

    def artifact(self, version: str) -> tuple[Path, float | None]:
        """The cached model.gguf of `version` and the conversion's seconds (manifest record)."""
        manifest = json.loads((self.ws / "store" / "manifest.json").read_text())
        entry = next(v for v in manifest["versions"][self.parts.name] if v["version_id"] == version)
        key, record = next(iter(entry["artifacts"].items()))
        path = self.ws / "store" / ".cache" / "convert" / key / "model.gguf"
        return path, record.get("seconds")

    def rsync(self, extra: list[str], src: Path, dest: str) -> tuple[int, int, float]:
        """Bare rsync over the same ssh; returns (total bytes sent, literal data, seconds)."""
        argv = ["rsync", "-a", "--stats", *extra, "-e", self.ssh_e, str(src), f"{HOST}:{dest}"]
        t0 = time.perf_counter()
        proc = subprocess.run(
            argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RSYNC_TIMEOUT_S,
        )
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
        return _count(_BYTES_SENT, proc.stdout), _count(_LITERAL, proc.stdout), round(seconds, 2)

    def run(self) -> Result:
        res = Result(self.parts.name, self.parts.shape)
        self.write_config()
        entries = [self.deploy(1, res)]
        if not res.errors:
            entries.append(self.deploy(2, res))
        if res.errors:
            return res
        res.adapterctl_cycle1_bytes_sent = entries[0].get("bytes_sent", 0)
        res.adapterctl_bytes_sent = entries[1].get("bytes_sent", 0)
        res.convert = [e.get("convert") for e in entries]
        (old, s1), (new, s2) = self.artifact(entries[0]["version"]), self.artifact(entries[1]["version"])
        res.convert_seconds = [s1, s2]
        res.file_bytes = new.stat().st_size
        changed = gguf_format.changed_tensors(old, new)
        res.changed_tensor_bytes = gguf_format.changed_tensor_bytes(old, new)
        res.changed_tensors, res.tensors = len(changed), len(gguf_format.tensor_sizes(new))
        res.changed_names = sorted(changed)
        if res.changed_tensor_bytes:
            res.ratio = round(res.adapterctl_bytes_sent / res.changed_tensor_bytes, 3)

        bare = self.host.root / "bare"  # the host's filesystem is this machine's: set up by hand
        shutil.rmtree(bare, ignore_errors=True)
        for d in ("full", "delta", "old", "stage"):
            (bare / d).mkdir(parents=True)
        shutil.copy2(old, bare / "delta" / "model.gguf")
        shutil.copy2(old, bare / "old" / "model.gguf")
        (bare / "old" / "model.gguf").chmod(0o444)  # as in a release
        res.full_copy_bytes, _, res.full_copy_seconds = self.rsync(["--whole-file"], new, f"{bare}/full/")
        res.bare_delta_bytes, res.bare_delta_literal, res.bare_delta_seconds = self.rsync(
            ["--no-whole-file"], new, f"{bare}/delta/"
        )
        # what SSHTransport.sync_files runs for a new cycle: a fresh staging dir, the previous
        # release as --link-dest
        mirror = [f"--partial-dir={PARTIAL_DIR}", "--delay-updates", f"--link-dest={bare}/old"]
        mirror.append("--no-whole-file")
        res.linkdest_bytes, _, res.linkdest_seconds = self.rsync(mirror, new, f"{bare}/stage/")
        shutil.rmtree(bare, ignore_errors=True)
        return res


# -- output ---------------------------------------------------------------------------------------
def mib(n: int | None) -> str:
    if n is None or n < 0:
        return "-"
    return f"{n / 2**10:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def secs(s: float | None) -> str:
    return "-" if s is None else f"{s:.1f} s"


def print_table(results: list[Result]) -> None:
    rows = [
        ("file size (model.gguf, Q4_K_M)", lambda r: mib(r.file_bytes)),
        ("tensors changed / all", lambda r: f"{r.changed_tensors} / {r.tensors}"),
        ("changed tensor bytes", lambda r: mib(r.changed_tensor_bytes)),
        ("adapterctl bytes sent, cycle 2", lambda r: mib(r.adapterctl_bytes_sent)),
        (
            f"ratio adapterctl / changed (<= {TARGET_RATIO})",
            lambda r: (
                "-" if r.ratio is None else f"{r.ratio:.3f} {'yes' if r.ratio <= TARGET_RATIO else 'NO'}"
            ),
        ),
        ("bare rsync delta bytes sent", lambda r: mib(r.bare_delta_bytes)),
        ("  of which literal data", lambda r: mib(r.bare_delta_literal)),
        ("adapterctl's rsync options by hand", lambda r: mib(r.linkdest_bytes)),
        ("full copy bytes sent (--whole-file)", lambda r: mib(r.full_copy_bytes)),
        ("adapterctl bytes sent, cycle 1", lambda r: mib(r.adapterctl_cycle1_bytes_sent)),
        ("deploy cycle 1 (convert)", lambda r: _deploy_s(r, 0)),
        ("deploy cycle 2 (convert)", lambda r: _deploy_s(r, 1)),
        ("bare rsync delta", lambda r: secs(r.bare_delta_seconds)),
        ("full copy", lambda r: secs(r.full_copy_seconds)),
    ]
    head = ["", *(f"{r.model}" for r in results)]
    body = [[label, *(fn(r) for r in results)] for label, fn in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    for row in [head, *body]:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    for r in results:
        print(f"{r.model}: {r.shape}")
        for e in r.errors:
            print(f"{r.model}: FAILED {e}")
    print(f"machine: {machine()}")


def machine() -> str:
    lines = subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.splitlines()
    rsync = " ".join(lines[0].split()) if lines else "rsync ?"
    return f"nproc {os.cpu_count()}, {rsync}, one sshd host on loopback"


def _deploy_s(r: Result, i: int) -> str:
    if len(r.deploy_seconds) <= i:
        return "-"
    conv = r.convert_seconds[i] if len(r.convert_seconds) > i else None
    return f"{r.deploy_seconds[i]:.1f} s ({secs(conv)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--hidden", type=int, default=1024, help="synthetic model's hidden size (default 1024)")
    ap.add_argument("--layers", type=int, default=8, help="synthetic model's layers (default 8)")
    ap.add_argument("--rank", type=int, default=8, help="synthetic LoRA rank (default 8)")
    ap.add_argument("--models", default="tiny,synthetic", help="which models (default tiny,synthetic)")
    ap.add_argument(
        "--lora-scale",
        type=float,
        default=1.0,
        help="multiply the synthetic LoRAs' lora_B by this (default 1: peft's random init, whose update "
        "is about as large as the weights; 0.02 is closer to a fine-tune's)",
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = ap.parse_args()
    which = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in which if m not in ("tiny", "synthetic")]:
        ap.error(f"unknown model {', '.join(unknown)}: tiny or synthetic")

    sshhosts = load_sshhosts()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    results: list[Result] = []
    started = time.perf_counter()
    try:
        for name in which:
            mtmp = tmp / name
            log(f"[{name}] building the base and two LoRA cycles")
            if name == "tiny":
                parts = tiny_parts()
            else:
                parts = synthetic_parts(mtmp / "model", args.hidden, args.layers, args.rank, args.lora_scale)
            log(f"[{name}] {parts.shape}: built in {parts.seconds:.1f} s")
            hosts = sshhosts.start_hosts(mtmp / "hosts", [(HOST, False)])
            try:
                results.append(ModelBench(mtmp, hosts, parts).run())
            except (RuntimeError, subprocess.TimeoutExpired) as exc:  # a bare rsync or the CLI
                results.append(Result(name, parts.shape, errors=[str(exc)]))
            finally:
                hosts.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"total {time.perf_counter() - started:.0f} s (hosts stopped, {tmp} removed)")
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print_table(results)
    failed = [r.model for r in results if r.errors or r.ratio is None]
    if failed:  # a run that did not happen meets no goal
        print(f"FAILED: {', '.join(failed)}: no ratio measured, see the errors above", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
