"""Split the Graph into pipeline stages and sum what each stage holds and does.

Layers are cut into pp*vpp contiguous chunks as evenly as possible (the first chunks take
the remainder); chunk c runs on stage c % pp, so with vpp > 1 each stage holds vpp
non-adjacent chunks (Megatron's interleaved schedule). The embedding (layer -1) joins the
first chunk, the head and loss (layer L) the last; with tied embeddings and pp > 1 the
last stage also holds a copy of the embedding matrix, as Megatron-LM does.

All figures are for ONE sequence of the traced length on the whole (unsharded) model; the
cost model divides by the sharding of the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from tera.planner.fields import NODE_FIELDS

# Summed per kind; parameters are summed apart, split by how they shard.
SUMMED = tuple(f for f in NODE_FIELDS if f not in ("params", "param_bytes"))


@dataclass
class Totals:
    """Sums over a set of operator nodes, split by how they shard."""

    dense_params: int = 0  # replicated over dp and cp, sharded over tp
    replicated_params: int = 0  # dense, but whole on every tp rank (norms, router gate)
    expert_params: int = 0  # sharded over ep and etp, replicated over edp
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> SUMMED sums

    def add(self, node: dict) -> None:
        if node["expert"]:
            self.expert_params += node["params"]
        elif node.get("tp_replicated"):
            self.replicated_params += node["params"]
        else:
            self.dense_params += node["params"]
        sums = self.by_kind.setdefault(node["kind"], dict.fromkeys(SUMMED, 0))
        for key in SUMMED:
            sums[key] += node[key]

    def dense_per_rank(self, tp: int) -> float:
        """Dense parameters one tensor-parallel rank holds."""
        return self.dense_params / tp + self.replicated_params

    def total(self, key: str, kinds: tuple[str, ...] | None = None) -> int:
        return sum(v[key] for k, v in self.by_kind.items() if kinds is None or k in kinds)


@dataclass
class Stage:
    index: int
    layers: list[int]  # block indices on this stage, in execution order
    chunks: list[tuple[int, int]]  # (first, last) block of each virtual chunk
    totals: Totals
    per_layer_saved: list[int]  # saved bytes of each block, same order as `layers`
    per_layer_saved_lowp: list[int]  # the bf16 part of those (scales with precision)
    moe_layers: int
    dense_layers: int
    has_embedding: bool
    has_head: bool


def chunk_bounds(layers: int, chunks: int) -> list[tuple[int, int]]:
    """Inclusive (first, last) block of each chunk; sizes differ by at most one."""
    base, extra = divmod(layers, chunks)
    bounds, start = [], 0
    for c in range(chunks):
        size = base + (1 if c < extra else 0)
        bounds.append((start, start + size - 1))
        start += size
    return bounds


def split_stages(graph: nx.DiGraph, pp: int, vpp: int) -> list[Stage]:
    spec = graph.graph["spec"]
    L = spec["layers"]
    bounds = chunk_bounds(L, pp * vpp)
    stage_of_layer = {}
    for c, (first, last) in enumerate(bounds):
        for layer in range(first, last + 1):
            stage_of_layer[layer] = c % pp
    stage_of_layer[-1] = 0
    stage_of_layer[L] = (len(bounds) - 1) % pp
    stages = [
        Stage(
            s,
            [],
            [b for c, b in enumerate(bounds) if c % pp == s],
            Totals(),
            [],
            [],
            0,
            0,
            s == stage_of_layer[-1],
            s == stage_of_layer[L],
        )
        for s in range(pp)
    ]
    saved_by_layer: dict[int, int] = {}
    lowp_by_layer: dict[int, int] = {}
    moe_layers = set()
    for _, node in graph.nodes(data=True):
        layer = node["layer"]
        stages[stage_of_layer[layer]].totals.add(node)
        if 0 <= layer < L:
            saved_by_layer[layer] = saved_by_layer.get(layer, 0) + node["saved_bytes"]
            lowp_by_layer[layer] = lowp_by_layer.get(layer, 0) + node["saved_lowp_bytes"]
            if node["expert"]:
                moe_layers.add(layer)
    for stage in stages:
        stage.layers = [x for first, last in stage.chunks for x in range(first, last + 1)]
        stage.per_layer_saved = [saved_by_layer.get(x, 0) for x in stage.layers]
        stage.per_layer_saved_lowp = [lowp_by_layer.get(x, 0) for x in stage.layers]
        stage.moe_layers = sum(1 for x in stage.layers if x in moe_layers)
        stage.dense_layers = len(stage.layers) - stage.moe_layers
    last = stage_of_layer[L]
    if spec["tie_embeddings"] and last != stage_of_layer[-1]:
        # Megatron-LM keeps its own copy of a tied output matrix on the last stage (the
        # trace gives a tied head no parameters: the embedding owns the matrix).
        stages[last].totals.dense_params += spec["vocab"] * spec["hidden"]
    return stages
