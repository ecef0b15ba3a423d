"""The engines, behind one contract (:mod:`allknn.engines.base`), and the choice among them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from allknn.engines.approx import ApproxEngine
from allknn.engines.base import Engine, Found, Job
from allknn.engines.exact import ExactEngine
from allknn.engines.torch import TorchEngine

__all__ = ["ENGINES", "Engine", "Found", "Job", "check_method", "check_options", "choose"]

logger = logging.getLogger("allknn")

ENGINES: dict[str, Engine] = {engine.name: engine
                              for engine in (ExactEngine(), ApproxEngine(), TorchEngine())}
"""Registered engines by ``method=`` name."""

AUTO_EXACT_SECONDS = 60.0
"""``method="auto"`` takes an exact engine whose estimate is below this."""


def check_method(method: object, *, checkpoint: bool = False) -> str:
    """A registered engine's name, or ``"auto"``; with ``checkpoint``, one
    whose engine checkpoints (``"auto"`` ignores the checkpoint when it
    picks one that does not)."""
    if method != "auto" and method not in ENGINES:
        names = [repr(name) for name in ENGINES]
        raise ValueError(f"method must be {', '.join(names[:-1])}, {names[-1]} or 'auto', got {method!r}")
    if checkpoint and method != "auto" and not ENGINES[method].checkpoints:
        takes = " or ".join(repr(name) for name, engine in ENGINES.items() if engine.checkpoints)
        raise ValueError(f"checkpoint= works with method={takes} (or 'auto') only")
    return str(method)


def check_options(options: Mapping[str, Any], method: str = "auto") -> dict[str, Any]:
    """Check every engine's own options (before any work), each by the engine that declares it.

    Options are None where not given. With ``method="auto"`` any engine's
    options may be given (they apply if that engine is chosen); a named
    engine takes its own only, so that an option that would do nothing
    (``precision=`` on the CPU engine) is an error rather than ignored.

    Raises
    ------
    ValueError
        For an option no engine declares, one the named engine does not
        take, or a bad value.
    """
    checked = {}
    for name, value in options.items():
        owner = next((engine for engine in ENGINES.values() if name in engine.options), None)
        if owner is None:
            raise ValueError(f"unknown option {name!r}; engines take: "
                             + ", ".join(sorted(o for e in ENGINES.values() for o in e.options)))
        checked[name] = owner.options[name](value) if value is not None else None
    if method != "auto":
        foreign = [name for name, value in checked.items() if value is not None
                   and name not in ENGINES[method].options]
        if foreign:
            owners = {name: next(e.name for e in ENGINES.values() if name in e.options) for name in foreign}
            raise ValueError("; ".join(f"{name}= is an option of method={owner!r}"
                                       for name, owner in owners.items())
                             + f", and does nothing with method={method!r}; leave it out")
    for engine in ENGINES.values():
        engine.check_combination(checked)
    return checked


def choose(method: str, job: Job) -> Engine:
    """The engine ``method`` names, or for ``"auto"`` (among the engines it
    may choose, :attr:`~allknn.engines.base.Engine.auto`) an exact engine that
    can run the job in under ``AUTO_EXACT_SECONDS`` (else the fastest
    approximate one that can run it, else the fastest exact one).

    Raises
    ------
    ValueError
        If the named engine cannot run the job: ``method='name'`` and its
        :meth:`~allknn.engines.base.Engine.refusal`.
    """
    if method != "auto":
        engine = ENGINES[method]
        reason = engine.refusal(job)
        if reason is not None:
            raise ValueError(f"method={method!r} {reason}")
        return engine
    able = [engine for engine in ENGINES.values() if engine.auto and engine.refusal(job) is None]
    exact = [engine for engine in able if engine.exact]
    if len(able) == 1:
        return able[0]
    timed = {engine.name: engine.estimate_seconds(job) for engine in able}
    logger.info("auto: estimated seconds %s", timed)
    fast_exact = [engine for engine in exact if timed[engine.name] < AUTO_EXACT_SECONDS]
    pool = fast_exact or [engine for engine in able if not engine.exact] or exact
    return min(pool, key=lambda engine: timed[engine.name])
