"""Fidelity check (DESIGN §5): does the converted artifact answer like the PEFT original?

Run after a builder and before the artifact is cached. The reference is the adapter as trained:
transformers + PEFT on the base, float32, greedy. Every candidate engine gets the SAME prompt
token ids (the base's Hugging Face tokenizer, once per input), so tokenizer differences between
engines cannot hide or fake a difference, and one stop rule: an end-of-sequence token (not kept),
the first token whose text holds a newline (kept), or `max_tokens` tokens.

    adapter  mlx_lm: base + out/ as adapter           must be token-identical
    fused    mlx_lm: out/ alone                       must be token-identical
    merged   llama.cpp: the unquantized GGUF          must be token-identical
             llama.cpp: out/model.gguf                identical when F32/F16/BF16, else it must pass
                                                      every suite case the reference passes
    lora     llama.cpp: base GGUF + out/adapter.gguf  must be token-identical

mlx models are run in float32 like the reference (a bf16 base is upcast after loading), so the
check compares the conversion, not bf16 arithmetic. "Token-identical" is strict: a case that
diverges fails the check; the failure reports the reference's margin between its top two logits
at the first differing token, so a near tie is told apart from a wrong conversion.

torch/transformers/peft, mlx and llama_cpp are imported inside functions; a missing one is a
ConversionError naming the extra to install (or `fidelity: false`).
"""

from __future__ import annotations

import gc
import json
import time
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterctl.convert.job import Job
from adapterctl.convert.spec import DEFAULT_QUANT, UNQUANTIZED, ConversionError, FidelityFailed, dist_version
from adapterctl.health.suite import Expectation, match

HINT = "the conversion is not used; check the converter/base_dir, or set fidelity: false to skip"
MAX_FAILURES = 3  # failures kept per candidate in the record
Stream = Callable[[list[int]], Iterator[int]]  # prompt ids -> the engine's greedy next tokens


@dataclass(frozen=True)
class StopRule:
    """One stop rule for every engine (engine_mlx.Generator.tokens): eos excluded, newline included."""

    eos: frozenset[int]
    max_tokens: int
    newline: Callable[[int], bool]  # the token's text holds a newline

    def run(self, tokens: Iterator[int]) -> list[int]:
        out: list[int] = []
        try:
            for token in tokens:
                if token in self.eos:
                    break
                out.append(token)
                if self.newline(token) or len(out) >= self.max_tokens:
                    break
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()  # end the engine's generator now, not at garbage collection
        return out


@dataclass(frozen=True)
class Candidate:
    artifact: str  # "mlx adapter", "model.gguf Q4_K_M", ...
    engine: str  # "mlx" | "llama_cpp"
    load: Callable[[], tuple[Stream, Callable[[], None]]]  # -> (stream, release)
    identical: bool  # must be token-identical to the reference (else: must pass the suite)


def _needs(job: Job, what: str, extra: str, exc: BaseException) -> ConversionError:
    return ConversionError(
        f"model {job.model} {job.version}: the fidelity check of the {job.spec.label} needs {what}, "
        f"which this python cannot import ({type(exc).__name__}: {exc})",
        f"pip install -e '.[{extra}]' on this machine, or set fidelity: false",
    )


def _unchecked(reason: str) -> dict[str, Any]:
    return {"checked": False, "reason": reason}


# -- prompt and stop rule ----------------------------------------------------------------------


def _ids_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def prompt_ids(tokenizer, config: dict[str, Any], template: str, text: str) -> tuple[list[int], bool]:
    """(ids, bos_prepended): the prompt as the base's tokenizer encodes it (special tokens
    included), with its bos token put in front when the tokenizer does not add one itself but the
    model config has one (a Llama tokenizer.json saved without its <s> post-processor)."""
    prompt = template.replace("{input}", unicodedata.normalize("NFC", text))
    ids = list(tokenizer.encode(prompt))
    bos = tokenizer.bos_token_id
    if bos is not None and config.get("bos_token_id") is not None and (not ids or ids[0] != bos):
        return [bos, *ids], True
    return ids, False


def stop_rule(tokenizer, base_dir: Path, max_tokens: int) -> StopRule:
    """eos = the tokenizer's, config.json's and generation_config.json's end-of-sequence ids."""
    eos = set(_ids_list(tokenizer.eos_token_id))
    for name in ("config.json", "generation_config.json"):
        eos.update(_ids_list(_read_json(base_dir / name).get("eos_token_id")))
    known: dict[int, bool] = {}

    def newline(token: int) -> bool:
        if token not in known:
            known[token] = "\n" in tokenizer.decode([token])
        return known[token]

    return StopRule(frozenset(eos), max_tokens, newline)


# -- engines -----------------------------------------------------------------------------------


def _reference(job: Job, prompts: list[list[int]], rule: StopRule) -> tuple[list[list[int]], list, str]:
    """The PEFT original's greedy tokens per prompt, with the reference's top-2 logit margin at
    every step (to tell near ties from real differences), and its description."""
    try:
        import peft
        import torch
        import transformers
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise _needs(job, "torch, transformers and peft (the PEFT reference)", "model", exc) from None
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecations inside peft
            base = AutoModelForCausalLM.from_pretrained(
                str(job.base_dir), dtype=torch.float32, local_files_only=True
            )
            model = PeftModel.from_pretrained(base, str(job.source_dir), local_files_only=True).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ConversionError(
            f"model {job.model} {job.version}: fidelity check: PEFT cannot load {job.source_dir} on "
            f"{job.base_dir}: {type(exc).__name__}: {exc}",
            "check base_dir, or set fidelity: false",
        ) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()

    tokens, margins = [], []
    for ids in prompts:
        steps: list[float] = []
        tokens.append(rule.run(_hf_greedy(torch, model, ids, steps)))
        margins.append(steps)
    return tokens, margins, f"peft {peft.__version__} / transformers {transformers.__version__}"


def _hf_greedy(torch, model, ids: list[int], margins: list[float]) -> Iterator[int]:
    """Greedy next tokens of a transformers model (KV cache); appends each step's top-2 margin."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        while True:
            top = torch.topk(out.logits[0, -1].float(), 2)
            token = int(top.indices[0])
            margins.append(float(top.values[0] - top.values[1]))
            yield token
            step = torch.tensor([[token]])
            out = model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)


def _mlx_loader(job: Job, path: Path, adapter: Path | None, rule: StopRule) -> Callable:
    def load() -> tuple[Stream, Callable[[], None]]:
        try:
            import mlx.core as mx
            import mlx_lm
            from mlx_lm.generate import generate_step
            from mlx_lm.sample_utils import make_sampler
        except (ImportError, OSError) as exc:  # plain `mlx` on Linux: libmlx.so is in the cpu extra
            raise _needs(job, "mlx_lm", "mlx", exc) from None
        model, _ = mlx_lm.load(str(path), adapter_path=str(adapter) if adapter else None)
        model.set_dtype(mx.float32)  # compute like the reference: compare the conversion, not bf16 math
        sampler = make_sampler(temp=0.0)

        def stream(ids: list[int]) -> Iterator[int]:
            for token, _ in generate_step(mx.array(ids), model, max_tokens=rule.max_tokens, sampler=sampler):
                yield int(token)

        return stream, lambda: None

    return load


def _llama_loader(job: Job, model_path: Path, lora_path: Path | None, n_ctx: int, quantized: bool):
    def load() -> tuple[Stream, Callable[[], None]]:
        try:
            import llama_cpp
        except (ImportError, OSError) as exc:
            raise _needs(job, "llama-cpp-python", "gguf", exc) from None
        if quantized:  # a native AMX build segfaults on quantized GGUFs: it would take this process down
            from adapterctl.health.engine_llamacpp import AMX_FIX, _system_info, amx_hazard

            try:
                cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
            except OSError:
                cpuinfo = ""
            if amx_hazard(cpuinfo, _system_info(llama_cpp)):
                raise ConversionError(
                    f"model {job.model} {job.version}: fidelity check: this llama-cpp-python was built "
                    "with AMX on an AMX CPU, which segfaults on quantized GGUFs",
                    AMX_FIX + ", or set fidelity: false",
                )
        llm = llama_cpp.Llama(
            model_path=str(model_path),
            lora_path=str(lora_path) if lora_path else None,
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 512),
            seed=0,
            verbose=False,
        )

        def stream(ids: list[int]) -> Iterator[int]:
            llm.reset()  # every case from an empty KV cache, like the reference
            yield from llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)

        return stream, llm.close

    return load


def _require(job: Job, module: str, what: str, extra: str) -> None:
    """Import `module` now, so a missing engine fails before minutes of reference decoding."""
    try:
        __import__(module)
    except (ImportError, OSError) as exc:  # plain `mlx` on Linux: libmlx.so is in mlx[cpu]
        raise _needs(job, what, extra, exc) from None


def _version(dist: str) -> str:
    return dist_version(dist) or "?"


def _candidates(job: Job, out: Path, meta: dict[str, Any], rule: StopRule, n_ctx: int) -> list[Candidate]:
    fmt = job.spec.format
    paths = meta.get("_paths") or {}
    if fmt in ("adapter", "fused"):
        _require(job, "mlx_lm", "mlx_lm", "mlx")
    else:
        _require(job, "llama_cpp", "llama-cpp-python", "gguf")
    mlx_engine = f"mlx_lm {_version('mlx-lm')}"
    llama_engine = f"llama_cpp {_version('llama_cpp_python')}"

    def path_of(key: str) -> Path:
        if not paths.get(key):
            raise ConversionError(
                f"model {job.model} {job.version}: the {job.spec.label} builder did not report its {key}",
                "a bug in adapterctl.convert.gguf: its meta needs _paths." + key,
            )
        return Path(paths[key])

    if fmt == "adapter":
        return [Candidate("mlx adapter", mlx_engine, _mlx_loader(job, job.base_dir, out, rule), True)]
    if fmt == "fused":
        return [Candidate("fused MLX model", mlx_engine, _mlx_loader(job, out, None, rule), True)]
    if fmt == "lora":
        base = path_of("base_gguf")
        loader = _llama_loader(job, base, out / "adapter.gguf", n_ctx, quantized=False)
        return [Candidate(f"adapter.gguf on {base.name}", llama_engine, loader, True)]
    if fmt == "merged":
        quant = (job.spec.quant or DEFAULT_QUANT).upper()
        shipped = out / "model.gguf"
        found = []
        if quant not in UNQUANTIZED or paths.get("unquantized_gguf"):
            unquantized = path_of("unquantized_gguf")
            if not (unquantized.exists() and shipped.exists() and unquantized.samefile(shipped)):
                loader = _llama_loader(job, unquantized, None, n_ctx, quantized=False)
                found.append(Candidate("unquantized GGUF", llama_engine, loader, True))
        loader = _llama_loader(job, shipped, None, n_ctx, quantized=quant not in UNQUANTIZED)
        found.append(Candidate(f"model.gguf {quant}", llama_engine, loader, quant in UNQUANTIZED))
        return found
    raise ConversionError(f"model {job.model} {job.version}: no fidelity check for format {fmt!r}")


# -- the check ---------------------------------------------------------------------------------


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def check(
    job: Job, out: Path, meta: dict[str, Any], scratch: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Compare the artifact in `out` with the PEFT original on the model's health suite inputs.

    Returns the record kept in the artifact's meta ({"checked": False, "reason": ...} when not
    run). Raises FidelityFailed when a must-be-identical candidate's tokens differ from the
    reference's (or it cannot be loaded), or a quantized one fails a suite case the reference
    passes; ConversionError when torch/transformers/peft, mlx_lm or llama_cpp is missing.
    """
    if not job.spec.fidelity:
        return _unchecked("fidelity: false in the config")
    if not job.fidelity.inputs:
        return _unchecked("the model has no text health suite")
    if job.base_dir is None:
        return _unchecked("no base_dir")
    started = time.monotonic()
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise _needs(job, "transformers (the base's tokenizer)", "model", exc) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(job.base_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConversionError(
            f"model {job.model} {job.version}: fidelity check: cannot load the tokenizer of "
            f"{job.base_dir}: {exc}",
            "check base_dir, or set fidelity: false",
        ) from None
    config = _read_json(job.base_dir / "config.json")
    inputs = list(job.fidelity.inputs)
    encoded = [prompt_ids(tokenizer, config, job.fidelity.prompt_template, text) for text in inputs]
    prompts = [ids for ids, _ in encoded]
    rule = stop_rule(tokenizer, job.base_dir, job.fidelity.max_tokens)
    n_ctx = max(len(ids) for ids in prompts) + job.fidelity.max_tokens + 16
    candidates = _candidates(job, out, meta, rule, n_ctx)
    try:
        import peft  # noqa: F401  (the reference; checked before any model is loaded)
        import torch  # noqa: F401
    except ImportError as exc:
        raise _needs(job, "torch, transformers and peft (the PEFT reference)", "model", exc) from None
    expect: dict[str, Expectation] = {}
    if job.fidelity.suite is not None:
        expect = {case.input: case.expect for case in job.fidelity.suite.cases}

    def text(tokens: list[int]) -> str:
        return _first_line(tokenizer.decode(tokens))

    def suite(tokens: list[int], case: str) -> tuple[bool, str] | None:
        return match(expect[case], text(tokens)) if case in expect else None

    t0 = time.monotonic()
    ref_tokens, ref_margins, reference = _reference(job, prompts, rule)
    gc.collect()  # the reference model, before any candidate is loaded
    ref_suite = [suite(t, case) for t, case in zip(ref_tokens, inputs, strict=True)]
    ref_passed = sum(1 for s in ref_suite if s and s[0])
    progress(
        f"fidelity: PEFT reference ({reference}, float32) on {len(inputs)} cases in "
        f"{time.monotonic() - t0:.2f} s; suite {ref_passed}/{sum(1 for s in ref_suite if s)} passed"
    )

    results, failed = [], []
    for cand in candidates:
        t0 = time.monotonic()
        try:
            stream, release = cand.load()
        except ConversionError:
            raise
        except Exception as exc:  # mlx_lm / llama.cpp raise ValueError/RuntimeError/KeyError on bad files
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"  # one line
            results.append(
                {"artifact": cand.artifact, "engine": cand.engine, "loaded": False, "error": error}
            )
            failed.append((cand, f"does not load with {cand.engine}: {error}"))
            progress(f"fidelity: {cand.artifact} does not load with {cand.engine}")
            continue
        try:
            got = [rule.run(stream(ids)) for ids in prompts]
        finally:
            release()
            del stream
            gc.collect()
        identical = [g == r for g, r in zip(got, ref_tokens, strict=True)]
        verdicts = [suite(t, case) for t, case in zip(got, inputs, strict=True)]
        suite_failed = [  # cases the reference passes and the candidate does not
            i for i, (v, r) in enumerate(zip(verdicts, ref_suite, strict=True)) if r and r[0] and not v[0]
        ]
        bad = [i for i, same in enumerate(identical) if not same] if cand.identical else suite_failed
        failures = []
        for i in bad[:MAX_FAILURES]:
            entry = {"input": inputs[i], "expected": text(ref_tokens[i]), "got": text(got[i])}
            at = _first_difference(got[i], ref_tokens[i])
            if at is not None:
                entry["first_difference_at"] = at
                if at < len(ref_margins[i]):
                    entry["reference_top2_margin"] = round(ref_margins[i][at], 6)
            if i in suite_failed:
                entry["suite"] = verdicts[i][1]
            failures.append(entry)
        n = len(inputs)
        record = {
            "artifact": cand.artifact,
            "engine": cand.engine,
            "must_be_identical": cand.identical,
            "identical": sum(identical),
            "token_agreement": round(sum(identical) / n, 4),
            "suite_passed": not suite_failed and all(v is None or v[0] for v in verdicts),
            "suite_cases_passed": sum(1 for v in verdicts if v and v[0]),
            "failures": failures,
            "seconds": round(time.monotonic() - t0, 2),
        }
        results.append(record)
        line = f"fidelity: {cand.artifact} {sum(identical)}/{n} cases token-identical to PEFT"
        if not cand.identical:
            total = sum(1 for v in verdicts if v is not None)
            line += f", suite {record['suite_cases_passed']}/{total} passed (PEFT {ref_passed}/{total})"
        progress(f"{line} ({record['seconds']:.2f} s, {cand.engine})")
        if bad:
            failed.append((cand, _describe(cand, bad, failures, n, sum(identical))))

    report = {
        "checked": True,
        "reference": reference,
        "cases": len(inputs),
        "bos_prepended": any(prepended for _, prepended in encoded),
        "reference_suite_passed": ref_passed,
        "results": results,
        "seconds": round(time.monotonic() - started, 2),
    }
    if failed:
        cand, why = failed[0]
        also = f" (also: {', '.join(c.artifact for c, _ in failed[1:])})" if len(failed) > 1 else ""
        error = FidelityFailed(
            f"model {job.model} {job.version}: {job.spec.label} does not behave like the PEFT original: "
            f"{cand.artifact} {why}{also}",
            HINT,
        )
        error.report = report  # the full record, for callers that print it
        raise error
    return report


def _first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two sequences differ (None when equal)."""
    for k, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))


def _describe(cand: Candidate, bad: list[int], failures: list[dict], n: int, identical: int) -> str:
    first = failures[0]
    where = ""
    if "first_difference_at" in first:
        where = f" from token {first['first_difference_at']}"
        if "reference_top2_margin" in first:
            where += f" (PEFT's top two logits {first['reference_top2_margin']:.3g} apart there)"
    if cand.identical:
        return (
            f"differs on {len(bad)}/{n} cases; first {first['input']!r}{where}: "
            f"PEFT said {first['expected']!r}, the artifact {first['got']!r}"
        )
    return (
        f"fails {len(bad)} suite case(s) the PEFT original passes ({identical}/{n} token-identical); "
        f"first {first['input']!r}: {first.get('suite', '')}; PEFT said {first['expected']!r}, "
        f"the artifact {first['got']!r}"
    )
