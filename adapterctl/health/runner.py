"""Run a health suite through an engine and summarize what happened."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from adapterctl.errors import PhaseError
from adapterctl.health.base import HealthEngine, HealthTarget
from adapterctl.health.suite import HealthSuite, match


@dataclass
class CaseResult:
    input: str
    output: str
    passed: bool
    reason: str  # "" when passed
    latency_ms: float


@dataclass
class HealthResult:
    suite: str
    engine: str
    cases: list[CaseResult]
    all_passed: bool
    latency_p50_ms: float
    latency_p95_ms: float
    error: str | None = None  # engine failure that stopped the suite

    @property
    def failures(self) -> list[CaseResult]:
        return [c for c in self.cases if not c.passed]

    def to_dict(self) -> dict:
        """A JSON-able summary for reports and --json output."""
        return {
            "suite": self.suite,
            "engine": self.engine,
            "all_passed": self.all_passed,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p95_ms": self.latency_p95_ms,
            "failures": [
                {"input": c.input, "output": c.output, "reason": c.reason, "latency_ms": c.latency_ms}
                for c in self.failures
            ],
            "cases": len(self.cases),
            "error": self.error,
        }


def _percentile(values: list[float], pct: float) -> float:
    # Nearest-rank: the smallest value with at least pct% of the values at or below it.
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


def run_suite(
    suite: HealthSuite,
    engine: HealthEngine,
    target: HealthTarget,
    clock: Callable[[], float] = time.perf_counter,
) -> HealthResult:
    """Run every case of `suite` through `engine` on `target`; always closes the engine.

    A case fails on a mismatch or when slower than its latency limit. An engine PhaseError does
    not propagate: it ends the run, sets `error`, and marks the cases not yet run as failed.
    """
    results: list[CaseResult] = []
    latencies: list[float] = []
    error = None
    try:
        engine.start(target)
        for case in suite.cases:
            started = clock()
            output = engine.generate(case.input)
            elapsed = clock() - started
            latencies.append(elapsed * 1000)
            passed, reason = match(case.expect, output)
            limit = case.max_latency_s if case.max_latency_s is not None else suite.max_latency_s
            if elapsed > limit:
                passed = False
                reason = "; ".join(filter(None, [reason, f"took {elapsed:.2f} s > {limit:.2f} s"]))
            results.append(CaseResult(case.input, output, passed, reason, round(elapsed * 1000, 3)))
    except PhaseError as exc:
        error = str(exc)
        results += [CaseResult(c.input, "", False, "engine error", 0.0) for c in suite.cases[len(results) :]]
    finally:
        engine.close()
    return HealthResult(
        suite=suite.name,
        engine=engine.describe(),
        cases=results,
        all_passed=error is None and all(r.passed for r in results),
        latency_p50_ms=round(_percentile(latencies, 50), 3),
        latency_p95_ms=round(_percentile(latencies, 95), 3),
        error=error,
    )


def _clip(text: str, width: int = 24) -> str:
    return text if len(text) <= width else text[:width].rstrip() + "…"


def format_failures(result: HealthResult) -> list[str]:
    """Lines for the CLI: the engine error (if any), then each failing case with its full output."""
    lines = [f"  ✗ engine error: {result.error}"] if result.error else []
    for case in result.failures:
        output = f'"{case.output}"' if case.reason != "engine error" else "(not run)"
        lines.append(f'  ✗ "{_clip(case.input)}" → {output} ({case.reason})')
    return lines
