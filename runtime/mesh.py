"""The device meshes of a plan, built from the planner's rank groups and checked against them.

`Meshes.from_plan(plan)` (after init_process_group, on every rank) builds two DeviceMeshes
over the same ranks, dimensions outermost first:
  dense   ("pp", "dp_replicate", "dp_shard", "cp", "tp")
  expert  ("pp", "dp_replicate", "edp", "ep", "etp")
plus three flattened meshes for the merged axes of planner/ranks.py: "dp" (dp_replicate x
dp_shard), "dp_cp" (with cp) and "edp_full" (dp_replicate x edp).

The rank grids come from `tera.planner.ranks.process_groups`, the one function the cost
model also uses: a rank's coordinate on an axis is its index in its (sorted) group of that
axis, which holds for both of Megatron's rank orders because ranks grow with every
coordinate. Start-up then asserts that every group torch created, on every axis merged or
not, is the planner's group for that axis; a disagreement is a MeshError naming the axis.

Invariant: for every axis a in tera.planner.ranks.ALL_AXES,
  sorted(get_process_group_ranks(meshes.group(a))) == group_of(plan.layout.mesh, a, rank).
"""

from __future__ import annotations

import numpy as np
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from tera.planner.ranks import ALL_AXES, MeshShape, group_of, process_groups

DENSE_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # outermost first
EXPERT_DIMS = ("pp", "dp_replicate", "edp", "ep", "etp")
FLATTENED = {  # merged axis -> (mesh, dims flattened, outermost first)
    "dp": ("dense", ("dp_replicate", "dp_shard")),
    "dp_cp": ("dense", ("dp_replicate", "dp_shard", "cp")),
    "edp_full": ("expert", ("dp_replicate", "edp")),
}


class MeshError(RuntimeError):
    """The plan cannot run in this world (wrong size, or torch's groups disagree with the
    planner's). The message is one line naming what disagrees and the fix."""


def rank_grid(shape: MeshShape, dims: tuple[str, ...]) -> np.ndarray:
    """Ranks laid out on `dims` (outermost first): grid[coords] is the rank at coords,
    each coordinate being the rank's index in its group of that axis."""
    groups = process_groups(shape)
    sizes = [len(groups[axis][0]) for axis in dims]
    coords = np.zeros((shape.world, len(dims)), dtype=np.int64)
    for i, axis in enumerate(dims):
        for group in groups[axis]:
            coords[group, i] = np.arange(len(group))
    grid = np.full(sizes, -1, dtype=np.int64)
    grid[tuple(coords.T)] = np.arange(shape.world)
    assert (np.sort(grid, axis=None) == np.arange(shape.world)).all(), "not a permutation"
    return grid


class Meshes:
    """The plan's meshes on this rank. Use `group(axis)`, `mesh(axis)` and the rank
    properties rather than reaching into the DeviceMeshes' dimensions."""

    def __init__(self, shape: MeshShape, dense: DeviceMesh, expert: DeviceMesh):
        self.shape = shape
        self.dense = dense
        self.expert = expert
        own = (dist.get_backend(), None)  # a new group even where the ranks are the world's
        self._flat = {
            name: (dense if mesh == "dense" else expert)[dims]._flatten(name, backend_override=own)
            for name, (mesh, dims) in FLATTENED.items()
        }
        self._groups = {axis: self.mesh(axis).get_group() for axis in ALL_AXES}
        # HSDP all-reduces expert shards over the expert mesh's dp_replicate dimension
        self._groups["edp_replicate"] = expert["dp_replicate"].get_group()

    @classmethod
    def from_plan(cls, plan) -> Meshes:
        """Build and verify the meshes of `plan` in the current process group."""
        world = dist.get_world_size()
        if plan.world_size != world:
            raise MeshError(
                f"the plan is for {plan.world_size} ranks but this world has {world}; "
                f"launch {plan.world_size} processes or plan again for {world} GPUs"
            )
        shape = plan.layout.mesh
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        # Every axis gets a group of its own, even one spanning the whole world: torch
        # would otherwise hand the world group to several axes, and the collective
        # counter (comm_stats.py) could not tell their bytes apart.
        own = ((dist.get_backend(), None),)
        dense, expert = (
            DeviceMesh(
                device,
                rank_grid(shape, dims).tolist(),
                mesh_dim_names=dims,
                backend_override=own * len(dims),
            )
            for dims in (DENSE_DIMS, EXPERT_DIMS)
        )
        meshes = cls(shape, dense, expert)
        meshes.verify(shape)
        return meshes

    def verify(self, shape: MeshShape) -> None:
        """Assert that torch's group of every axis on this rank is `shape`'s."""
        rank = dist.get_rank()
        for axis in ALL_AXES:
            torch_group = sorted(dist.get_process_group_ranks(self.group(axis)))
            planned = group_of(shape, axis, rank)
            if torch_group != planned:
                raise MeshError(
                    f"mesh axis {axis!r}: rank {rank}'s torch group {torch_group} is not the "
                    f"planner's {planned}; the runtime and planner/ranks.py disagree"
                )

    # ---- axes -------------------------------------------------------------------------
    def mesh(self, axis: str) -> DeviceMesh:
        """The 1-D mesh of a dense, expert or merged axis ("tp", "edp", "dp", ...)."""
        if axis in self._flat:
            return self._flat[axis]
        if axis in DENSE_DIMS:
            return self.dense[axis]
        if axis in EXPERT_DIMS:
            return self.expert[axis]
        raise KeyError(f"unknown axis {axis!r}")

    def group(self, axis: str) -> dist.ProcessGroup:
        return self._groups[axis] if axis in self._groups else self.mesh(axis).get_group()

    def size(self, axis: str) -> int:
        return self.mesh(axis).size()

    def local_rank(self, axis: str) -> int:
        return self.mesh(axis).get_local_rank()

    def axis_of_group(self, group: dist.ProcessGroup) -> str | None:
        """The axis whose group on this rank is `group` (for the collective counter).
        Where one torch group serves several axes (same ranks), the names are joined by
        "+" in ALL_AXES order, e.g. "dp_shard+dp" when dp_replicate is 1."""
        names = [axis for axis, mine in self._groups.items() if mine is group]
        if not names and group is dist.GroupMember.WORLD:
            return "world"
        return "+".join(names) or None

    # ---- this rank's coordinates ---------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        """Coordinate in data parallelism (dp_replicate x dp_shard, replicate outermost):
        the index of this rank's slice of the global batch."""
        return self.local_rank("dp")

    @property
    def dp_size(self) -> int:
        return self.size("dp")

    @property
    def pp_rank(self) -> int:
        return self.local_rank("pp")

    @property
    def pp_size(self) -> int:
        return self.size("pp")
