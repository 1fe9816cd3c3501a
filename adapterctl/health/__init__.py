"""Health checks: run a suite of inputs through an engine on the release under test (DESIGN §6)."""

from adapterctl.health.base import HealthEngine, HealthTarget
from adapterctl.health.command import CommandEngine
from adapterctl.health.engines import make_engine
from adapterctl.health.runner import CaseResult, HealthResult, format_failures, run_suite
from adapterctl.health.suite import (
    BUILTIN_SUITES,
    Expectation,
    HealthCase,
    HealthSuite,
    load_suite,
    match,
    resolve_suite,
)

__all__ = [
    "BUILTIN_SUITES",
    "CaseResult",
    "CommandEngine",
    "Expectation",
    "HealthCase",
    "HealthEngine",
    "HealthResult",
    "HealthSuite",
    "HealthTarget",
    "format_failures",
    "load_suite",
    "make_engine",
    "match",
    "resolve_suite",
    "run_suite",
]
