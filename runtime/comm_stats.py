"""Bytes of every collective this rank issues, by the parallelism its process group serves.

`CommCounter(meshes)` is a context manager (a TorchDispatchMode) that sees every collective
at the dispatcher, below all Python entry points: the c10d API (torch.distributed.all_reduce,
all_gather_into_tensor / all_gather_single, reduce_scatter_tensor / reduce_scatter_single,
all_to_all_single, broadcast, send / isend, batch_isend_irecv, list all_gather and
reduce_scatter ...) lowers to `torch.ops.c10d.*` ops, and DTensor, FSDP2 and the functional
collectives lower to `torch.ops._c10d_functional.*` (their autograd variants, forward and
backward, lower to the same ops, so nothing is counted twice). FSDP2 calls
dist.all_gather_single / reduce_scatter_single / all_reduce and torch.distributed.pipelining
calls dist.batch_isend_irecv of P2POp(isend / irecv): all of them arrive here as c10d ops.
Backward collectives count: autograd carries the mode in its thread-local state (checked on
CPU, where backward runs in the calling thread; not yet on a GPU).

Byte convention (topologies/collectives.py's, the one planner/cost/comm_bytes.py predicts
in): the logical payload of the call on this rank, whatever the algorithm moves on the wire:
  all_reduce      the tensor (every tensor of a coalesced call)
  all_gather      the gathered output
  reduce_scatter  the full input
  all_to_all      the input: the bytes this rank sends, the slice it keeps included
  broadcast       the tensor, on every rank (reduce: the tensor; gather: the input this
                  rank contributes; scatter: the output it receives)
  send            the tensor sent; receives are not counted, so a transfer counts once, at
                  its sender
Barriers carry no payload and are not counted, nor is a call on a group of one rank, which
moves nothing (FSDP2 over a one-rank mesh still calls its collectives).

Kind: the parallelism of the call's process group, from `meshes.axis_of_group(group)`
(runtime/mesh.py) mapped by AXIS_KINDS: "tp", "cp", "ep", "pp", "dp" (dense data
parallelism: dp_shard, dp_replicate and their merges with cp), "edp" (expert data
parallelism), "etp" (expert tensor parallelism), "world" (the world group when it is no
axis's group: the trainer's scalar reductions). Where one torch group serves axes of several
kinds (the meshes give "tp+edp" when torch reused one group for both), the call's
collective decides only where it can (an all-to-all is ep's or etp's, whichever of the two
the group serves, a send pp's; any other call on a dp and ep group is dp's, ep issuing only
all-to-alls); otherwise, and for a group the meshes do not know, the call counts under
"other". Build the meshes with one process group per axis (no axis reusing the world
group) and nothing lands there.

Invariant: a counted byte lands under exactly one kind, and `step_bytes()` holds only kinds
that were used since the last `reset()`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._python_dispatch import TorchDispatchMode

OTHER = "other"
AXIS_KINDS = {  # mesh axis name (runtime/mesh.py, planner/ranks.py) -> kind
    "tp": "tp",
    "cp": "cp",
    "ep": "ep",
    "etp": "etp",
    "pp": "pp",
    "dp": "dp",
    "dp_shard": "dp",
    "dp_replicate": "dp",
    "dp_cp": "dp",
    "dp_shard_cp": "dp",
    "edp": "edp",
    "edp_full": "edp",
    "edp_replicate": "edp",
    "world": "world",
}
# Collectives that only some kinds issue, which settle a group shared by several kinds when
# exactly one of their issuers is among them.
OWNERS = {"all_to_all": ("ep", "etp"), "send": ("pp",)}


def nbytes(tensors) -> int:
    """Bytes of a tensor or of every tensor in (nested) lists of them."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(nbytes(t) for t in tensors)


@dataclass(frozen=True)
class _Rule:
    """How to count one collective op: its name and its payload from the named args."""

    op: str  # all_reduce | all_gather | reduce_scatter | all_to_all | broadcast | ...
    payload: Callable[[dict], int]
    names: tuple[str, ...]  # the op's argument names, to name positional args


def _sends(a: dict) -> int:
    return sum(nbytes(t) for op, t in zip(a["op_list"], a["tensors"], strict=True) if op == "isend")


# Per op: (kind of collective, payload on this rank). Ops missing here (barriers, receives,
# wait_tensor) carry no payload this rank sends under the convention above.
_C10D = {
    "allreduce_": ("all_reduce", lambda a: nbytes(a["tensors"])),
    "allreduce_coalesced_": ("all_reduce", lambda a: nbytes(a["tensors"])),
    "allgather_": ("all_gather", lambda a: nbytes(a["output_tensors"])),
    "_allgather_base_": ("all_gather", lambda a: nbytes(a["output_tensor"])),
    "allgather_coalesced_": ("all_gather", lambda a: nbytes(a["output_lists"])),
    "allgather_into_tensor_coalesced_": ("all_gather", lambda a: nbytes(a["outputs"])),
    "reduce_scatter_": ("reduce_scatter", lambda a: nbytes(a["input_tensors"])),
    "_reduce_scatter_base_": ("reduce_scatter", lambda a: nbytes(a["input_tensor"])),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", lambda a: nbytes(a["inputs"])),
    "alltoall_base_": ("all_to_all", lambda a: nbytes(a["input"])),
    "alltoall_": ("all_to_all", lambda a: nbytes(a["input_tensors"])),
    "broadcast_": ("broadcast", lambda a: nbytes(a["tensors"])),
    "reduce_": ("reduce", lambda a: nbytes(a["tensors"])),
    "gather_": ("gather", lambda a: nbytes(a["input_tensors"])),
    "scatter_": ("scatter", lambda a: nbytes(a["output_tensors"])),
    "send": ("send", lambda a: nbytes(a["tensors"])),
}
_FUNCTIONAL = {
    "all_reduce": ("all_reduce", lambda a: nbytes(a["input"])),
    "all_reduce_": ("all_reduce", lambda a: nbytes(a["input"])),
    "all_reduce_coalesced": ("all_reduce", lambda a: nbytes(a["inputs"])),
    "all_reduce_coalesced_": ("all_reduce", lambda a: nbytes(a["inputs"])),
    "all_gather_into_tensor": ("all_gather", lambda a: nbytes(a["input"]) * a["group_size"]),
    "all_gather_into_tensor_out": ("all_gather", lambda a: nbytes(a["out"])),
    "all_gather_into_tensor_coalesced": (
        "all_gather",
        lambda a: nbytes(a["inputs"]) * a["group_size"],
    ),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a: nbytes(a["input"])),
    "reduce_scatter_tensor_out": ("reduce_scatter", lambda a: nbytes(a["input"])),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", lambda a: nbytes(a["inputs"])),
    "all_to_all_single": ("all_to_all", lambda a: nbytes(a["input"])),
    "broadcast": ("broadcast", lambda a: nbytes(a["input"])),
    "broadcast_": ("broadcast", lambda a: nbytes(a["input"])),
    "isend": ("send", lambda a: nbytes(a["tensor"])),
    "batch_p2p_ops": ("send", _sends),
}


def _rules() -> dict[torch._ops.OpOverload, _Rule]:
    """Every counted OpOverload (all overloads of each op) -> its rule."""
    rules = {}
    for namespace, table in ((torch.ops.c10d, _C10D), (torch.ops._c10d_functional, _FUNCTIONAL)):
        for name, (op, payload) in table.items():
            packet = getattr(namespace, name)
            for overload in packet.overloads():
                func = getattr(packet, overload)
                names = tuple(arg.name for arg in func._schema.arguments)
                rules[func] = _Rule(op, payload, names)
    return rules


class CommCounter(TorchDispatchMode):
    """Counts the bytes of this rank's collectives by kind while entered (`with counter:`).

    `meshes` needs `axis_of_group(group: ProcessGroup) -> str | None` (runtime/mesh.py's
    Meshes). A counter may be entered again and again: counts accumulate until `reset()`.
    """

    def __init__(self, meshes):
        super().__init__()
        self.meshes = meshes
        self._rules = _rules()
        self._kinds: dict[str, frozenset[str]] = {}  # process group name -> kinds
        self._bytes: Counter[tuple[str, str]] = Counter()  # (kind, op) -> bytes
        self._calls: Counter[tuple[str, str]] = Counter()  # (kind, op) -> calls

    def reset(self) -> None:
        self._bytes.clear()
        self._calls.clear()

    def step_bytes(self) -> dict[str, int]:
        """{kind: bytes} since the last reset (kinds with no call are absent)."""
        totals: Counter[str] = Counter()
        for (kind, _), n in self._bytes.items():
            totals[kind] += n
        return dict(totals)

    def step_ops(self) -> dict[str, dict[str, int]]:
        """{kind: {collective: bytes}} since the last reset, to tell where a kind's bytes
        came from (all_gather vs reduce_scatter ...)."""
        ops: dict[str, dict[str, int]] = {}
        for (kind, op), n in sorted(self._bytes.items()):
            ops.setdefault(kind, {})[op] = n
        return ops

    def step_calls(self) -> dict[str, dict[str, int]]:
        """{kind: {collective: number of calls}} since the last reset."""
        calls: dict[str, dict[str, int]] = {}
        for (kind, op), n in sorted(self._calls.items()):
            calls.setdefault(kind, {})[op] = n
        return calls

    def kinds_of(self, group: dist.ProcessGroup) -> frozenset[str]:
        """The kinds a process group serves (cached by group name: groups live for the
        run); {"other"} for a group the meshes do not know."""
        name = group.group_name
        if name not in self._kinds:
            axis = self.meshes.axis_of_group(group)
            axes = axis.split("+") if axis else [OTHER]
            self._kinds[name] = frozenset(AXIS_KINDS.get(a, OTHER) for a in axes)
        return self._kinds[name]

    def kind_of(self, group: dist.ProcessGroup, op: str) -> str:
        """The kind a call of collective `op` on `group` counts under (module docstring)."""
        kinds = self.kinds_of(group)
        if len(kinds) == 1:
            return next(iter(kinds))
        owners = [kind for kind in OWNERS.get(op, ()) if kind in kinds]
        if len(owners) == 1:
            return owners[0]
        if kinds == {"dp", "ep"}:
            return "dp"
        return OTHER

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = self._rules.get(func)
        if rule is not None:
            named = dict(zip(rule.names, args, strict=False)) | kwargs
            if "process_group" in named:  # c10d ops carry the group as a ScriptObject
                group = dist.ProcessGroup.unbox(named["process_group"])
            else:  # functional ops carry its name
                group = _resolve_process_group(named["group_name"])
            if group.size() > 1:
                key = (self.kind_of(group, rule.op), rule.op)
                self._bytes[key] += rule.payload(named)
                self._calls[key] += 1
        return func(*args, **kwargs)
