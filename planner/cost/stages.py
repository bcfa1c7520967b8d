"""Segments of the Graph and the pipeline stages built from them.

The cost model works on four kinds of segment, each the sum of its operator nodes:
  embedding  the nodes before the blocks (layer -1)
  dense      one dense transformer block
  moe        one MoE transformer block
  head       the final norm, the output projection and the loss (layer `layers`)
Blocks of one kind are identical (the tracer replicates one traced block; `segments`
checks it), so a stage is fully described by how many segments of each kind it holds,
and every cost of a stage is a sum over its segments. That linearity is what lets the
solver (planner/solve) cost any partition of layers exactly.

A layout's pp*vpp virtual chunks hold contiguous blocks (`Layout.chunk_sizes`); chunk c
runs on stage c % pp, so with vpp > 1 each stage holds vpp non-adjacent chunks
(Megatron's interleaved schedule). The embedding joins chunk 0, the head the last chunk;
with tied embeddings and pp > 1 the head's stage also holds its own copy of the
embedding matrix, as Megatron-LM does (segment `tied_head`).

All figures are for ONE sequence of the traced length on the whole (unsharded) model; the
cost model divides by the sharding of the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from tera.planner.fields import NODE_FIELDS

# Summed per kind; parameters are summed apart, split by how they shard.
SUMMED = tuple(f for f in NODE_FIELDS if f not in ("params", "param_bytes"))
SEGMENT_KINDS = ("embedding", "dense", "moe", "head", "tied_head")
BLOCK_KINDS = ("dense", "moe")


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

    def add_totals(self, other: Totals, times: int = 1) -> None:
        self.dense_params += times * other.dense_params
        self.replicated_params += times * other.replicated_params
        self.expert_params += times * other.expert_params
        for kind, sums in other.by_kind.items():
            mine = self.by_kind.setdefault(kind, dict.fromkeys(SUMMED, 0))
            for key in SUMMED:
                mine[key] += times * sums[key]

    def dense_per_rank(self, tp: int) -> float:
        """Dense parameters one tensor-parallel rank holds."""
        return self.dense_params / tp + self.replicated_params

    def total(self, key: str, kinds: tuple[str, ...] | None = None) -> int:
        return sum(v[key] for k, v in self.by_kind.items() if kinds is None or k in kinds)


@dataclass(frozen=True)
class Segments:
    """The model as segment totals plus the kind of every block."""

    totals: dict[str, Totals]  # SEGMENT_KINDS -> totals (absent kinds are empty)
    block_kinds: tuple[str, ...]  # "dense" | "moe" for each block, in order

    @property
    def layers(self) -> int:
        return len(self.block_kinds)

    @property
    def tied(self) -> bool:
        """Whether the head keeps its own copy of a tied embedding (pp > 1)."""
        return bool(self.totals["tied_head"].dense_params)

    def held(self, stage: int, pp: int) -> dict[str, int]:
        """The segments other than blocks that `stage` of `pp` holds whatever the
        partition: the embedding on the first, the head (and a tied copy of the
        embedding, pp > 1) on the last (the last chunk runs on stage pp - 1)."""
        last = stage == pp - 1
        return {
            "embedding": int(stage == 0),
            "head": int(last),
            "tied_head": int(last and pp > 1 and self.tied),
        }

    def whole_model(self, pp: int) -> dict[str, int]:
        """How many segments of each kind `pp` stages hold together."""
        counts = {k: self.block_kinds.count(k) for k in BLOCK_KINDS}
        counts.update(embedding=1, head=1, tied_head=int(pp > 1 and self.tied))
        return counts

    def dense_before(self, block: int) -> int:
        """Dense blocks among blocks 0 .. block-1."""
        return sum(1 for kind in self.block_kinds[:block] if kind == "dense")


def segments(graph: nx.DiGraph) -> Segments:
    """Sum the graph's nodes into segments; blocks of one kind must be identical."""
    spec = graph.graph["spec"]
    layers = spec["layers"]
    per_layer: dict[int, Totals] = {}
    moe_layers = set()
    for _, node in graph.nodes(data=True):
        per_layer.setdefault(node["layer"], Totals()).add(node)
        if node["expert"]:
            moe_layers.add(node["layer"])
    kinds = tuple("moe" if x in moe_layers else "dense" for x in range(layers))
    totals = {kind: Totals() for kind in SEGMENT_KINDS}
    totals["embedding"] = per_layer.get(-1, Totals())
    totals["head"] = per_layer.get(layers, Totals())
    for kind in BLOCK_KINDS:
        blocks = [per_layer[x] for x in range(layers) if kinds[x] == kind]
        if blocks:
            if any(b != blocks[0] for b in blocks):
                raise ValueError(f"{kind} blocks of {spec['name']} differ; cannot segment")
            totals[kind] = blocks[0]
    if spec["tie_embeddings"]:
        # The trace gives a tied head no parameters (the embedding owns the matrix).
        totals["tied_head"] = Totals(dense_params=spec["vocab"] * spec["hidden"])
    return Segments(totals, kinds)


@dataclass
class Stage:
    """One pipeline stage of a layout: its chunks and how many segments of each kind."""

    index: int
    chunks: list[tuple[int, int]]  # (first, last) block of each virtual chunk
    counts: dict[str, int]  # SEGMENT_KINDS -> how many this stage holds
    recompute: str  # none | selective | full
    totals: Totals  # the sum of its segments (for reporting)

    @property
    def layers(self) -> list[int]:
        """Block indices on this stage, in execution order."""
        return [x for first, last in self.chunks for x in range(first, last + 1)]

    @property
    def moe_layers(self) -> int:
        return self.counts["moe"]

    @property
    def dense_layers(self) -> int:
        return self.counts["dense"]

    @property
    def has_embedding(self) -> bool:
        return bool(self.counts["embedding"])

    @property
    def has_head(self) -> bool:
        return bool(self.counts["head"])


def chunk_bounds(sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """Inclusive (first, last) block of each chunk of the given sizes."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size - 1))
        start += size
    return bounds


def split_stages(segs: Segments, layout) -> list[Stage]:
    """The stages of a resolved layout (its partition and per-stage recompute)."""
    pp = layout.pp
    bounds = chunk_bounds(layout.chunk_sizes(segs.layers))
    stages = []
    for s in range(pp):
        chunks = [b for c, b in enumerate(bounds) if c % pp == s]
        counts = dict.fromkeys(SEGMENT_KINDS, 0)
        for first, last in chunks:
            for x in range(first, last + 1):
                counts[segs.block_kinds[x]] += 1
        counts.update(segs.held(s, pp))
        totals = Totals()
        for kind, n in counts.items():
            totals.add_totals(segs.totals[kind], n)
        stages.append(Stage(s, chunks, counts, layout.stage_recompute[s], totals))
    return stages


def split_chunks(segs: Segments, layout) -> list[list[Stage]]:
    """The virtual chunks of a resolved layout, per stage in chunk order: entry [s][k] is
    global chunk k*pp + s, a Stage holding only that chunk's blocks, with the embedding
    on chunk 0 and the head (and a tied copy of the embedding) on the last chunk. The
    counts of a stage's chunks add up to that stage's counts in `split_stages`."""
    pp = layout.pp
    bounds = chunk_bounds(layout.chunk_sizes(segs.layers))
    last_chunk = len(bounds) - 1
    stages: list[list[Stage]] = [[] for _ in range(pp)]
    for c, (first, last) in enumerate(bounds):
        s = c % pp
        counts = dict.fromkeys(SEGMENT_KINDS, 0)
        for x in range(first, last + 1):
            counts[segs.block_kinds[x]] += 1
        held = segs.held(s, pp)
        counts["embedding"] = held["embedding"] if c == 0 else 0
        counts["head"] = held["head"] if c == last_chunk else 0
        counts["tied_head"] = held["tied_head"] if c == last_chunk else 0
        totals = Totals()
        for kind, n in counts.items():
            totals.add_totals(segs.totals[kind], n)
        stages[s].append(Stage(s, [(first, last)], counts, layout.stage_recompute[s], totals))
    return stages
