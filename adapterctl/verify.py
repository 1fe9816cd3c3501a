"""Running a planned health check: before activation on the staged release, after it on the live one.

The plan resolved the suite and the engine spec for the endpoint (steps.HealthPlan); this module
only runs them, compares the discriminator with the base model and words the failures.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from adapterctl.errors import HealthCheckFailed, PhaseError

if TYPE_CHECKING:  # steps calls in here; the arrow goes one way at run time
    from adapterctl.steps import HealthPlan, StepContext, Verify


def _target(ctx: StepContext, plan: HealthPlan, key: str | None):
    from adapterctl.health import HealthTarget

    ep, model_cfg = ctx.ep, ctx.run.cfg.models[ctx.model]
    if plan.local:  # --health-local: this machine, the stored artifact
        from adapterctl.transports.local import LocalTransport

        path = plan.release
        if key is not None and key in ctx.run.artifacts:  # converted in this run: its cache entry
            path = str(ctx.run.artifacts[key].dir)
        return HealthTarget(
            endpoint=ep.name,
            model=ctx.model,
            version_id=ctx.outcome.version or "",
            release_path=path,
            adapter_dir=str(ctx.run.cfg.store),
            base_model=model_cfg.base_model,
            transport=LocalTransport(f"{ep.name} (local health)"),
        )
    return HealthTarget(
        endpoint=ep.name,
        model=ctx.model,
        version_id=ctx.outcome.version or "",
        release_path=f"{ep.adapter_dir}/{ctx.model}/{plan.release}",
        adapter_dir=ep.adapter_dir,
        base_model=model_cfg.base_model,
        transport=ctx.transport,
    )


def run_health(ctx: StepContext, plan: HealthPlan, key: str | None = None) -> dict[str, Any]:
    """Run the planned suite through its engine; returns the result as a dict (never raises for failures)."""
    from pathlib import Path

    from adapterctl.health import make_engine, resolve_suite, run_suite

    suite = resolve_suite(plan.suite, Path(plan.suite_dir))
    result = run_suite(suite, make_engine(asdict(plan.spec)), _target(ctx, plan, key))
    d = result.to_dict()
    verdict = "passed" if result.all_passed else f"FAILED ({len(result.failures)} of {d['cases']})"
    ctx.say(
        f"health-check {plan.release}: {verdict}, "
        f"p50 {d['latency_p50_ms']:.1f} ms, p95 {d['latency_p95_ms']:.1f} ms"
    )
    return d


def health_message(ctx: StepContext, version: str | None, result: dict[str, Any]) -> str:
    """One summary line, then one line per failing sentence with its actual output."""
    lines = [f'  ✗ "{f["input"]}" → "{f["output"]}" ({f["reason"]})' for f in result["failures"]]
    head = (
        f"endpoint {ctx.endpoint}: {ctx.model} {version} failed its health check "
        f"({len(result['failures'])} of {result['cases']} sentences)"
    )
    if result.get("error"):
        head += f": {result['error']}"
    return "\n".join([head, *lines])


def discriminate(ctx: StepContext, plan: HealthPlan, prompt: str) -> dict[str, Any]:
    """Ask the live release and the base model the discriminator prompt; compare normalized answers."""
    from adapterctl.health import make_engine

    spec = plan.spec
    target = _target(ctx, plan, None)
    answers = []
    for engine in (
        make_engine(asdict(spec)),
        make_engine({"command": spec.base_command, "timeout_s": spec.timeout_s, "env": spec.env}),
    ):
        with engine:
            engine.start(target)
            answers.append(engine.generate(prompt))
    norm = [unicodedata.normalize("NFC", a).casefold().strip() for a in answers]
    ctx.say(f"discriminator {prompt!r}: live {answers[0]!r}, base {answers[1]!r}")
    return {"input": prompt, "output": answers[0], "base_output": answers[1], "differs": norm[0] != norm[1]}


def verify_live(ctx: StepContext, step: Verify) -> None:
    """The verify phase: suite (and discriminator) against `active`. Raises HealthCheckFailed (deploy:
    the transaction compensates) or PhaseError (report-only: a manual rollback stands)."""
    if step.base:
        ctx.say("base model: health suite not applicable (the reload was confirmed above)")
        ctx.status_update({"health_status": "base_model"})
        return
    if step.health is None:
        return
    result = run_health(ctx, step.health)
    ctx.outcome.health["post_activation"] = result
    if result["all_passed"] and step.discriminator:
        result["discriminator"] = disc = discriminate(ctx, step.health, step.discriminator)
        if not disc["differs"]:
            result["all_passed"] = False
            result["error"] = (
                f"the live service answers {disc['input']!r} exactly like the base model "
                f"({disc['output']!r}): the adapter is loaded but ignored"
            )
    if result["all_passed"]:
        return
    message = health_message(ctx, step.version, result)
    if step.report_only:
        ctx.status_update({"health_status": "unhealthy"})
        raise PhaseError(message, "the rollback stands; choose another release with --to VERSION")
    raise HealthCheckFailed(message)
