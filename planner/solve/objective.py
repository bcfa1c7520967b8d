"""What the search minimises, as one integer per (configuration, step time).

The CP-SAT model of a configuration (model.py) always minimises the step time in integer
ns; the objective turns that into the value the search ranks configurations by, so that
the branch and bound, the enumeration and the certificate share one definition:

  step_time  value = step ns
  cost       value = step ns * GPUs, GPU-ns per step: at a fixed global batch and sequence
             this orders plans as dollars per token do at any price per GPU-hour
  gpus       value = GPUs * GPU_WEIGHT + step ns, only for plans whose step meets the
             deadline (step ns <= step_limit_ns): the fewest GPUs first, the fastest plan
             on that many GPUs next. GPU_WEIGHT exceeds any step limit, so the order is
             lexicographic.

Every value is monotone in the step time within a configuration, so a lower bound on the
step time gives a lower bound on the value, and "value < cutoff" is "step ns < the
configuration's step cutoff" (`step_cutoff`), the constraint CP-SAT gets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tera.planner.solve.space import Config
from tera.planner.solve.tables import NS

OBJECTIVES = ("step_time", "cost", "gpus")
GPU_WEIGHT = 10**18  # ns, 31 years: more than any step limit (checked in Objective)


@dataclass(frozen=True)
class Objective:
    kind: str  # one of OBJECTIVES
    step_limit_ns: int | None = None  # gpus: the slowest step that meets the deadline

    def __post_init__(self) -> None:
        assert self.kind in OBJECTIVES
        if self.kind == "gpus":
            assert self.step_limit_ns is not None and 0 <= self.step_limit_ns < GPU_WEIGHT

    def value(self, config: Config, step_ns: int) -> int | None:
        """The ranking value of `config` at `step_ns`, or None when it misses the
        deadline (a lower bound of the step in, a lower bound of the value out)."""
        if self.kind == "step_time":
            return step_ns
        if self.kind == "cost":
            return step_ns * config.gpus
        if step_ns > self.step_limit_ns:
            return None
        return config.gpus * GPU_WEIGHT + step_ns

    def step_cutoff(self, config: Config, cutoff: int | None) -> int | None:
        """A step-ns limit L such that value(config, step) < cutoff, and the deadline
        met, hold exactly when step < L; None when nothing limits the step."""
        if self.kind == "step_time":
            return cutoff
        if self.kind == "cost":
            return None if cutoff is None else -(-cutoff // config.gpus)
        limit = self.step_limit_ns + 1
        if cutoff is not None:
            limit = min(limit, cutoff - config.gpus * GPU_WEIGHT)
        return limit

    def in_units(self, value: float, tokens_per_step: int, price_per_gpu_hour: float) -> float:
        """The value as reported: seconds per step, dollars per million tokens, or GPUs."""
        if self.kind == "step_time":
            return value * NS
        if self.kind == "cost":
            return value * NS / 3600 * price_per_gpu_hour / tokens_per_step * 1e6
        return float(value // GPU_WEIGHT)


def step_limit_ns(tokens: float, deadline_days: float, tokens_per_step: int) -> int:
    """The slowest step that trains `tokens` within `deadline_days` (steps rounded up)."""
    steps = math.ceil(tokens / tokens_per_step)
    return min(math.floor(deadline_days * 86400 / steps / NS), GPU_WEIGHT - 1)


def gpu_counts(most: int, domain: int, node: int, objective: str) -> list[int]:
    """GPU counts the search may use, largest first: `most` for the step time; for cost
    and for the fewest GPUs, also every count below it of the form domain * 2^k, and
    domain * 3 * 2^(k-1) where that is whole nodes (steps of at most 2x, mostly 1.5x):
    `domain` is the scale-up domain, `node` the GPUs per node."""
    if objective == "step_time":
        return [most]
    counts = {most}
    size = domain
    while size < most:
        counts.add(size)
        if size * 3 // 2 < most and size * 3 % (2 * node) == 0:
            counts.add(size * 3 // 2)
        size *= 2
    return sorted(counts, reverse=True)
