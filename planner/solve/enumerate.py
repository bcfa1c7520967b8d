"""Exhaustive enumeration of the search space: the yardstick the CP-SAT search is held to.

Every configuration of the space, every partition of the blocks into pp*vpp non-empty
contiguous chunks and every per-stage recompute assignment is costed with
`ConfigTables.step_ns`, the objective the CP-SAT model encodes. Feasible only for small
models; `candidates` counts the space without costing it, for extrapolation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

from tera.planner.solve.search import Searcher
from tera.planner.solve.space import Config
from tera.planner.solve.tables import MODES, stages_of


@dataclass(frozen=True)
class Enumerated:
    objective_ns: int | None  # None: nothing fits
    config: Config | None
    partition: tuple[int, ...] | None
    recompute: tuple[str, ...] | None
    candidates: int  # (configuration, partition, recompute) triples costed


def compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to write `total` as an ordered sum of `parts` positive integers."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield tuple(b - a for a, b in itertools.pairwise(bounds))


def candidates(config: Config, layers: int) -> int:
    """Partitions times recompute assignments of one configuration."""
    return math.comb(layers - 1, config.pp * config.vpp - 1) * len(MODES) ** config.pp


def enumerate_space(searcher: Searcher) -> Enumerated:
    """The minimum of the objective over the whole space, by brute force."""
    best = Enumerated(None, None, None, None, 0)
    count = 0
    layers = searcher.segs.layers
    for config in searcher.space.configs():
        tables = searcher.tables(config)
        for partition in compositions(layers, config.pp * config.vpp):
            for recompute in itertools.product(MODES, repeat=config.pp):
                count += 1
                step = tables.step_ns(stages_of(searcher.segs, config, partition, recompute))
                if step is None:
                    continue
                value = searcher.objective.value(config, step)
                if value is None:
                    continue
                if best.objective_ns is None or value < best.objective_ns:
                    best = Enumerated(value, config, partition, recompute, 0)
    return Enumerated(best.objective_ns, best.config, best.partition, best.recompute, count)
