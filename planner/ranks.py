"""Every process group of a layout, in Megatron-LM rank order. The one source of truth.

Ranks are laid out innermost axis first (stride 1):
  dense  mesh: tp, cp, dp_shard, dp_replicate, pp
  expert mesh: etp, ep, edp, dp_replicate, pp
with tp * cp * dp_shard == etp * ep * edp: expert parallelism re-slices the ranks of one
dense block (one pipeline stage, one dp_replicate slice); pp is outermost in both.

Worked example from DESIGN.md (16 ranks, tp2 pp2 ep4 etp1, so dp4 and edp2):
  tp  [0,1] [2,3] ...            dp  [0,2,4,6] [1,3,5,7] [8,10,12,14] [9,11,13,15]
  pp  [0,8] [1,9] ...            ep  [0,1,2,3] [4,5,6,7] [8..11] [12..15]
  edp [0,4] [1,5] [2,6] [3,7] [8,12] ...

The mapping of the axes onto ranks (and so onto the topology: the innermost ranks share a
node) is one of Megatron-LM's two orders, innermost first:
  tp-cp-dp-pp  (default)        tp, cp, dp_shard, dp_replicate, pp
  tp-cp-pp-dp  (--use-tp-pp-dp-mapping)  tp, cp, pp, dp_shard, dp_replicate
The second puts the pipeline neighbours of small tp*cp blocks inside a node at the price of
spreading data and expert parallelism. In both, the expert mesh re-slices each dense
block's ranks, taken in dense order, as etp (innermost), ep, edp.

Invariant: for every axis, the groups partition range(world) into groups of the axis size,
and the cost model and the runtime both call `process_groups`, so they cannot disagree
about which ranks talk to each other.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

DENSE_AXES = ("tp", "cp", "dp_shard", "dp_replicate", "pp")  # innermost first
EXPERT_AXES = ("etp", "ep", "edp", "dp_replicate", "pp")
DEFAULT_ORDER = "tp-cp-dp-pp"
ORDERS = {  # rank order -> dense axes innermost first
    DEFAULT_ORDER: DENSE_AXES,
    "tp-cp-pp-dp": ("tp", "cp", "pp", "dp_shard", "dp_replicate"),
}

# Groups formed by merging adjacent mesh axes: data parallelism as a whole, the group
# Megatron reduces dense gradients over (dp with cp), and the expert gradient group.
MERGED_AXES = {
    "dp": ("dense", ("dp_shard", "dp_replicate")),
    "dp_cp": ("dense", ("cp", "dp_shard", "dp_replicate")),
    "edp_full": ("expert", ("edp", "dp_replicate")),
}


@dataclass(frozen=True)
class MeshShape:
    """Degrees of every mesh axis; `world` is their product."""

    tp: int = 1
    cp: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    order: str = DEFAULT_ORDER

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order {self.order!r} is not one of {', '.join(ORDERS)}")
        for name in ("tp", "cp", "dp_shard", "dp_replicate", "pp", "ep", "etp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        block = self.tp * self.cp * self.dp_shard
        if block % (self.ep * self.etp):
            raise ValueError(f"ep*etp = {self.ep * self.etp} must divide tp*cp*dp_shard = {block}")

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp_shard * self.dp_replicate * self.pp

    @property
    def edp(self) -> int:
        return self.tp * self.cp * self.dp_shard // (self.ep * self.etp)

    def sizes(self, mesh: str) -> dict[str, int]:
        """Axis sizes innermost first: the dense axes in this order's rank order, the
        expert axes as they re-slice a dense block."""
        axes = ORDERS[self.order] if mesh == "dense" else EXPERT_AXES
        return {a: getattr(self, a) for a in axes}

    @cached_property
    def _grids(self) -> dict[str, np.ndarray]:
        """Rank grids with one dimension per axis, outermost first as listed by
        reversed(DENSE_AXES) and reversed(EXPERT_AXES), whatever the order."""
        physical = ORDERS[self.order]
        ranks = np.arange(self.world).reshape([getattr(self, a) for a in reversed(physical)])
        logical = list(reversed(DENSE_AXES))
        dense = np.transpose(ranks, [list(reversed(physical)).index(a) for a in logical])
        # a dense block's ranks in dense order (dp_shard, cp, tp) re-sliced as (edp, ep, etp)
        expert = dense.reshape([getattr(self, a) for a in reversed(EXPERT_AXES)])
        return {"dense": dense, "expert": expert}

    def groups(self, axis: str) -> list[list[int]]:
        """The process groups of one axis (or merged axis), each sorted, the list sorted."""
        if axis in MERGED_AXES:
            mesh, members = MERGED_AXES[axis]
        elif axis in DENSE_AXES:
            mesh, members = "dense", (axis,)
        elif axis in EXPERT_AXES:
            mesh, members = "expert", (axis,)
        else:
            raise KeyError(f"unknown axis {axis!r}")
        axes = DENSE_AXES if mesh == "dense" else EXPERT_AXES
        grid = self._grids[mesh]
        order = list(reversed(axes))  # grid dimension i holds axis order[i]
        group_dims = [order.index(a) for a in members]
        other_dims = [d for d in range(grid.ndim) if d not in group_dims]
        # Members vary fastest innermost: list group dims outermost-first so that the
        # flattened group is in increasing rank order.
        moved = np.transpose(grid, other_dims + sorted(group_dims))
        size = int(np.prod([grid.shape[d] for d in group_dims]))
        return sorted(sorted(g) for g in moved.reshape(-1, size).tolist())

    def first_group(self, axis: str) -> range | RankGroup:
        """The group of `axis` holding rank 0 (groups of one axis all have its shape). In
        the default order the members of an axis, or of adjacent merged axes, are evenly
        spaced by the product of the sizes of the axes inside them: a range."""
        mesh, members = MERGED_AXES.get(axis, (None, (axis,)))
        if mesh is None:
            if axis not in DENSE_AXES + EXPERT_AXES:
                raise KeyError(f"unknown axis {axis!r}")
            mesh = "dense" if axis in DENSE_AXES else "expert"
        axes = DENSE_AXES if mesh == "dense" else EXPERT_AXES
        if self.order != DEFAULT_ORDER:
            return _first_group_of_grid(self, axis)
        first = axes.index(members[0])
        stride = math.prod(getattr(self, a) for a in axes[:first])
        size = math.prod(getattr(self, a) for a in members)
        return range(0, stride * size, stride)


class RankGroup(tuple):
    """The ranks of a group that are not evenly spaced: a tuple that hashes once, so that
    cost models can key cached collective times by it."""

    def __hash__(self) -> int:
        if "_hash" not in self.__dict__:
            self.__dict__["_hash"] = super().__hash__()
        return self.__dict__["_hash"]


@functools.lru_cache(maxsize=4096)
def _first_group_of_grid(mesh: MeshShape, axis: str) -> range | RankGroup:
    """MeshShape.first_group read off the rank grid, for orders where it may be uneven."""
    grid_mesh, members = MERGED_AXES.get(axis, (None, (axis,)))
    if grid_mesh is None:
        grid_mesh = "dense" if axis in DENSE_AXES else "expert"
    axes = DENSE_AXES if grid_mesh == "dense" else EXPERT_AXES
    index = tuple(slice(None) if a in members else 0 for a in reversed(axes))
    ranks = np.sort(mesh._grids[grid_mesh][index].reshape(-1))
    if len(ranks) > 1 and (np.diff(ranks) == ranks[1] - ranks[0]).all():
        return range(int(ranks[0]), int(ranks[-1]) + 1, int(ranks[1] - ranks[0]))
    return range(int(ranks[0]), int(ranks[0]) + 1) if len(ranks) == 1 else RankGroup(ranks.tolist())


ALL_AXES = ("tp", "cp", "dp_shard", "dp_replicate", "pp", "etp", "ep", "edp", *MERGED_AXES)


def process_groups(mesh: MeshShape) -> dict[str, list[list[int]]]:
    """Every process group of the layout, keyed by axis name."""
    return {axis: mesh.groups(axis) for axis in ALL_AXES}


def group_of(mesh: MeshShape, axis: str, rank: int) -> list[int]:
    """The group of `axis` that contains `rank`."""
    for group in mesh.groups(axis):
        if rank in group:
            return group
    raise ValueError(f"rank {rank} outside world {mesh.world}")
