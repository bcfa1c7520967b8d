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

Invariant: for every axis, the groups partition range(world) into groups of the axis size,
and the cost model and the runtime both call `process_groups`, so they cannot disagree
about which ranks talk to each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

DENSE_AXES = ("tp", "cp", "dp_shard", "dp_replicate", "pp")  # innermost first
EXPERT_AXES = ("etp", "ep", "edp", "dp_replicate", "pp")

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

    def __post_init__(self) -> None:
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
        axes = DENSE_AXES if mesh == "dense" else EXPERT_AXES
        return {a: getattr(self, a) for a in axes}

    @cached_property
    def _grids(self) -> dict[str, np.ndarray]:
        """Rank grids indexed outermost axis first (numpy's C order = innermost last)."""
        ranks = np.arange(self.world)
        grids = {}
        for mesh, axes in (("dense", DENSE_AXES), ("expert", EXPERT_AXES)):
            shape = [getattr(self, a) for a in reversed(axes)]
            grids[mesh] = ranks.reshape(shape)
        return grids

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

    def first_group(self, axis: str) -> range:
        """The group of `axis` holding rank 0 (groups of one axis all have its shape): the
        members of an axis, or of adjacent merged axes, are evenly spaced by the product
        of the sizes of the axes inside them."""
        mesh, members = MERGED_AXES.get(axis, (None, (axis,)))
        if mesh is None:
            if axis not in DENSE_AXES + EXPERT_AXES:
                raise KeyError(f"unknown axis {axis!r}")
            mesh = "dense" if axis in DENSE_AXES else "expert"
        axes = DENSE_AXES if mesh == "dense" else EXPERT_AXES
        first = axes.index(members[0])
        stride = int(np.prod([getattr(self, a) for a in axes[:first]]))
        size = int(np.prod([getattr(self, a) for a in members]))
        return range(0, stride * size, stride)


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
