"""Trace a model into tera's Graph IR: a networkx DiGraph of operators.

The model is built on the `meta` device (no memory, no arithmetic) with balanced static
routing and run forward and backward on one sequence of `seq_len` tokens under a
TorchDispatchMode that sees every aten operator. Each aten op is attributed to the
innermost nn.Module executing it; a module's own ops form one operator node named by the
module's path (a container's own ops, such as a block's residual adds, get a ":kind"
suffix). Per node:

  kind         matmul | attention | norm | activation | router | permute | expert |
               unpermute | residual | embedding | loss
  layer        block index; -1 for the embedding, `layers` for the head and loss
  fwd_flops    FLOPs of the forward pass (2*m*n*k per matmul, torch's FLOP formulas)
  bwd_flops    FLOPs of the backward pass
  fwd_bytes    bytes the forward moves to and from memory as one fused kernel would:
               every tensor read from outside the node (another node, a parameter) once,
               every tensor it produces once when something outside reads it
  bwd_bytes    the same for the backward (saved tensors count as outside reads), plus
               one write of each weight gradient
  fwd_weight_bytes, bwd_weight_bytes
               the part of those bytes that is parameters and their gradients, which
               shards with the weights (tp, ep) rather than with the tokens
  params       parameters owned by the node (counted once; a tied head owns none)
  param_bytes  params * dtype bytes
  saved_bytes  bytes the forward saves for backward, each tensor counted once
  saved_lowp_bytes
               the part of saved_bytes held in the trace's bf16 (activations proper), which
               doubles in fp32 training; fp32 statistics and integer indices do not
  expert       True for routed expert parameters (sharded over ep rather than tp)
  tp_replicated
               True for parameters every tensor-parallel rank holds whole (norms, the
               router gate, MLA's down-projections to the latent): Megatron-LM's layout

Attention is costed as FlashAttention executes it: on `meta` torch decomposes attention
into two batched matmuls and a materialised softmax, whose FLOPs are the right count
(2 matmuls forward, 4 backward, no causal discount, as the published MFU convention
counts), but whose S x S intermediate is never stored by a fused kernel. So attention
nodes record bytes as q, k, v and output traffic and saved bytes as q, k, v, output and
the fp32 log-sum-exp, the tensors FlashAttention-2 keeps (arXiv 2307.08691 Alg. 2).

Only one block of each distinct kind (dense, MoE) is traced; the graph replicates it for
every layer, which is exact because blocks of one kind are identical. Routing is the
balanced assignment (every expert receives T*K/E rows); `imbalance` on the graph is the
factor by which the cost model may scale the busiest expert's work (1.0: balanced).

Graph attributes: model, spec, seq_len, batch (1), dtype_bytes, routing, imbalance.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict

import networkx as nx
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, register_flop_formula
from torch.utils.module_tracker import ModuleTracker
from torch.utils.weak import WeakTensorKeyDictionary

from tera.models import ModelSpec, build
from tera.models.ffn import FeedForward
from tera.models.moe import Experts, MoE, Permute, Router, Unpermute
from tera.models.transformer import (
    Attention,
    Block,
    CoreAttention,
    LMHead,
    MLAttention,
    RMSNorm,
    Transformer,
)
from tera.planner.fields import NODE_FIELDS

DTYPE = torch.bfloat16

# Kind of the operator formed by a module's own ops.
KIND_OF_MODULE = {
    torch.nn.Linear: "matmul",
    torch.nn.Embedding: "embedding",
    RMSNorm: "norm",
    CoreAttention: "attention",
    FeedForward: "activation",
    Block: "residual",
    Router: "router",
    Permute: "permute",
    Experts: "expert",
    Unpermute: "unpermute",
    MoE: "elementwise",
    Attention: "reshape",
    MLAttention: "reshape",
    LMHead: "loss",
    Transformer: "embedding",
}

_VIEW_OPS = {
    "view",
    "_unsafe_view",
    "expand",
    "transpose",
    "permute",
    "t",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "split",
    "split_with_sizes",
    "alias",
    "detach",
    "as_strided",
    "unbind",
    "chunk",
    "reshape",
    "_reshape_alias",
    "unflatten",
    "flatten",
    "narrow",
    "lift_fresh",
    "empty",
    "new_empty",
    "new_empty_strided",
    "empty_strided",
}


@dataclasses.dataclass
class _Node:
    kind: str
    layer: int
    fwd_flops: int = 0
    bwd_flops: int = 0
    fwd_bytes: int = 0
    bwd_bytes: int = 0
    fwd_weight_bytes: int = 0
    bwd_weight_bytes: int = 0
    params: int = 0
    param_bytes: int = 0
    saved_bytes: int = 0
    saved_lowp_bytes: int = 0
    expert: bool = False
    tp_replicated: bool = False


# Leaf modules whose weights tensor parallelism replicates rather than splits: MLA's
# down-projections produce a small latent every rank needs whole (tera's and HF's names);
# learned position embeddings are a plain embedding on every rank in Megatron-LM.
TP_REPLICATED_LEAVES = ("q_a_proj", "kv_a_proj", "kv_a_proj_with_mqa", "pos_embed")


def tp_replicated(kind: str, path: str) -> bool:
    """Whether the parameters of the node at `path` are whole on every tp rank."""
    leaf = path.rpartition(".")[2]
    return (
        kind in ("norm", "router") or leaf in TP_REPLICATED_LEAVES or path.endswith("router.gate")
    )


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class _GradFnClaimer(TorchFunctionMode):
    """Maps every autograd node created in the forward to the operator that created it,
    so that backward ops can be attributed exactly (see _Tracer.claim)."""

    def __init__(self, tracer: _Tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.tracer.in_backward:
            self.tracer.claim(out)
        return out


class _Recorder(TorchDispatchMode):
    """Attributes every aten op to the operator node of the innermost running module."""

    def __init__(self, tracer: _Tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.tracer.record(func, args, kwargs, out)
        return out


class _Tracer:
    def __init__(self, model: Transformer):
        self.model = model
        self.module_names = {m: n for n, m in model.named_modules()}
        self.modules_by_name = {n: m for m, n in self.module_names.items()}
        self.tracker = ModuleTracker()
        self.nodes: dict[str, _Node] = {}
        self.edges: set[tuple[str, str]] = set()
        self.producer = WeakTensorKeyDictionary()  # tensor -> node whose forward made it
        self.origin = WeakTensorKeyDictionary()  # tensor -> (node, "fwd" | "bwd") that made it
        self.readers = WeakTensorKeyDictionary()  # tensor -> {(node, pass)} that read it
        self.saved_storages: set[int] = set()
        self.param_ids = {id(p) for p in model.parameters()}  # weights are not activations
        self.grad_owner: dict[object, str] = {}  # autograd node -> operator that made it
        self.in_backward = False
        self.backward_owner: str | None = None
        self.last_path = ""  # module of the previous forward op
        self.segment: dict[str, int] = {}  # container path -> index of its current own-op run

    # -- attribution ----------------------------------------------------------------
    def current(self) -> str:
        """Node name for the innermost module in the tracker's stack."""
        parents = [p for p in self.tracker.parents if p != "Global"]
        if not parents:
            return "model:embedding"
        # The tracker names modules "Transformer.layers.0.attn"; strip the root name.
        name = max(parents, key=lambda p: p.count("."))
        path = name.partition(".")[2] if "." in name else ""
        if not self.in_backward and path != self.last_path:
            # A container's own ops that resume after one of its children ran (a block's
            # second residual add) form a new node, which keeps the graph acyclic.
            if self.last_path.startswith(f"{path}." if path else ""):
                self.segment[path] = self.segment.get(path, 0) + 1
            self.last_path = path
        return self.node_name(path, self.segment.get(path, 0))

    def node_name(self, path: str, segment: int = 0) -> str:
        module = self.modules_by_name[path]
        if next(module.children(), None) is None:
            return path
        suffix = f".{segment}" if segment else ""
        return f"{path or 'model'}:{self.kind_of(module)}{suffix}"

    def node(self, name: str) -> _Node:
        if name not in self.nodes:
            path = name.partition(":")[0]
            module = self.modules_by_name["" if path == "model" else path]
            self.nodes[name] = _Node(kind=self.kind_of(module), layer=self.layer_of(path))
        return self.nodes[name]

    # -- recording ------------------------------------------------------------------
    def record(self, func, args, kwargs, out) -> None:
        backward = self.in_backward
        if backward and self.backward_owner is None:
            return  # the autograd engine seeding the backward pass, not the model
        name = self.backward_owner if backward else self.current()
        node = self.node(name)
        direction = "bwd" if backward else "fwd"
        packet = func._overloadpacket
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
            setattr(node, f"{direction}_flops", getattr(node, f"{direction}_flops") + flops)
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        if packet.__name__ in _VIEW_OPS:  # a view: same data, same producer, no traffic
            for source_map in (self.origin, self.producer):
                source = next((source_map[t] for t in inputs if t in source_map), None)
                if source is not None:
                    for t in outputs:
                        source_map[t] = source
            return
        self._count_io(name, direction, inputs, outputs)
        if backward:
            return
        for t in inputs:
            source = self.producer.get(t)
            if source is not None and source != name:
                self.edges.add((source, name))
        for t in outputs:
            self.producer[t] = name

    def _count_io(self, name: str, direction: str, inputs, outputs) -> None:
        """Bytes a fused kernel for the node would move: each tensor it reads from outside
        (another node, the other pass, a parameter) once, and each tensor it produces once,
        when something outside first reads it. Ops inside one node exchange no memory."""
        me = (name, direction)
        for t in inputs:
            origin = self.origin.get(t)
            if origin == me:
                continue
            readers = self.readers.setdefault(t, set())
            if me in readers:
                continue
            readers.add(me)
            node = self.nodes[name]
            setattr(node, f"{direction}_bytes", getattr(node, f"{direction}_bytes") + _nbytes(t))
            base = t._base if t._base is not None else t
            if id(base) in self.param_ids:
                key = f"{direction}_weight_bytes"
                setattr(node, key, getattr(node, key) + _nbytes(t))
            if origin is not None and len(readers) == 1:  # first outside reader: a write
                writer = self.nodes[origin[0]]
                key = f"{origin[1]}_bytes"
                setattr(writer, key, getattr(writer, key) + _nbytes(t))
        for t in outputs:
            self.origin[t] = me

    def claim(self, out) -> None:
        """Give the autograd nodes behind `out` that no operator owns yet to the current
        operator, with a pre-hook that makes it the owner of the backward ops they run.
        Autograd runs one node at a time, so the last pre-hook to fire names the owner."""
        for t in _tensors(out):
            if t.grad_fn is None:
                continue
            # A view's backward belongs to whoever produced the data it views.
            name = self.producer.get(t) or self.current()
            stack = [t.grad_fn]
            while stack:
                fn = stack.pop()
                if fn is None or fn in self.grad_owner:
                    continue
                self.grad_owner[fn] = name
                fn.register_prehook(functools.partial(self._enter_backward_of, name))
                stack.extend(next_fn for next_fn, _ in fn.next_functions)

    def _enter_backward_of(self, name: str, grad_outputs):
        self.backward_owner = name

    def on_save(self, t: torch.Tensor):
        base = t._base if t._base is not None else t
        if not self.in_backward and id(base) not in self.param_ids:
            key = id(base)  # views of one tensor share its memory: count it once
            if key not in self.saved_storages:
                self.saved_storages.add(key)
                node = self.node(self.current())
                node.saved_bytes += _nbytes(t)
                if t.dtype == DTYPE:
                    node.saved_lowp_bytes += _nbytes(t)
        return t

    def kind_of(self, module: torch.nn.Module) -> str:
        """Operator kind of a module's own ops (override for foreign model families)."""
        return KIND_OF_MODULE[type(module)]

    def layer_of(self, path: str) -> int:
        """Block index of a module path: -1 before the blocks, `layers` after them."""
        parts = path.split(".")
        if parts[0] == "layers" and len(parts) > 1:
            return int(parts[1])
        if parts[0] == "head":
            return self.model.spec.layers
        return -1

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """The scalar the traced backward starts from (override for foreign models)."""
        return self.model(tokens, tokens)

    def run(self, seq_len: int) -> None:
        _register_extra_flop_formulas()
        tokens = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
        keep_alive = []  # saved tensors must outlive the forward so ids stay unique

        def pack(t):
            keep_alive.append(t)
            return self.on_save(t)

        with self.tracker, _GradFnClaimer(self), _Recorder(self):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = self.loss(tokens)
            self.in_backward = True
            loss.backward()
            self.in_backward = False
        for path, module in self.model.named_modules():
            own = list(module.parameters(recurse=False))
            if own:
                node = self.node(self.node_name(path))
                node.params += sum(p.numel() for p in own)
                node.param_bytes += sum(_nbytes(p) for p in own)
                node.expert = isinstance(module, Experts)
                node.tp_replicated = tp_replicated(self.kind_of(module), path)
                # the gradient of each weight is written once (accumulation is in place)
                node.bwd_bytes += sum(_nbytes(p) for p in own)
                node.bwd_weight_bytes += sum(_nbytes(p) for p in own)
        self._flash_attention_io()

    def _flash_attention_io(self) -> None:
        """Replace decomposed-attention bytes with what a fused kernel moves and keeps."""
        for path, module in self.model.named_modules():
            if not isinstance(module, CoreAttention):
                continue
            flash_attention_io(self.nodes[path], *self.attention_shapes[path])


def _register_extra_flop_formulas() -> None:
    """Give torch's FLOP registry the formulas of tera.planner.hf it lacks (aten._grouped_mm,
    which tera's expert GEMMs run), once; hf.py counts those ops itself only while torch
    has no formula, so nothing is counted twice."""
    from tera.planner.hf import EXTRA_FLOP_FORMULAS  # hf.py builds on this module

    for op, formula in EXTRA_FLOP_FORMULAS.items():
        if op not in flop_registry:
            register_flop_formula(op, get_raw=True)(formula)


def flash_attention_io(node: _Node, q, k, v, o) -> None:
    """Set an attention node's bytes to what FlashAttention moves and keeps for q, k, v
    and output of these (B, heads, S, dim) shapes."""
    lse = q[0] * q[1] * q[2] * 4  # fp32 log-sum-exp per query row and head
    io = sum(_numel(s) for s in (q, k, v, o)) * DTYPE.itemsize
    node.fwd_bytes = io + lse
    node.bwd_bytes = 2 * io + lse  # read q, k, v, o, do; write dq, dk, dv
    node.saved_bytes = io + lse
    node.saved_lowp_bytes = io


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _template_spec(spec: ModelSpec) -> tuple[ModelSpec, dict[str, int]]:
    """A spec with one block of each kind, and the template index of each kind."""
    kinds = sorted({spec.is_moe_layer(i) for i in range(spec.layers)})
    if kinds == [False, True]:
        moe = dataclasses.replace(spec.moe, first_dense_layers=1, every=1)
        return dataclasses.replace(spec, layers=2, moe=moe), {"dense": 0, "moe": 1}
    if kinds == [True]:
        moe = dataclasses.replace(spec.moe, first_dense_layers=0, every=1)
        return dataclasses.replace(spec, layers=1, moe=moe), {"moe": 0}
    return dataclasses.replace(spec, layers=1), {"dense": 0}


@functools.lru_cache(maxsize=32)
def trace(spec: ModelSpec, seq_len: int) -> nx.DiGraph:
    """The Graph IR of `spec` for one sequence of `seq_len` tokens (cached; treat the
    returned graph as read-only)."""
    if spec.position == "learned" and seq_len > spec.max_seq_len:
        from tera.models import SpecError

        raise SpecError(
            "seq_len",
            f"{seq_len} exceeds the {spec.max_seq_len} learned positions",
            f"use --seq-len <= {spec.max_seq_len}",
        )
    template, template_index = _template_spec(spec)
    if spec.position == "learned":
        template = dataclasses.replace(template, max_seq_len=max(seq_len, 1))
    model = build(template, device="meta", dtype=DTYPE, balanced_routing=True)
    tracer = _Tracer(model)
    tracer.attention_shapes = {}
    for path, module in model.named_modules():
        if isinstance(module, CoreAttention):
            module.register_forward_hook(_remember_shapes(tracer.attention_shapes, path))
    tracer.run(seq_len)
    if spec.position == "learned":  # the table has max_seq_len rows whatever we traced
        node = tracer.nodes["pos_embed"]
        node.params = spec.max_seq_len * spec.hidden
        node.param_bytes = node.params * DTYPE.itemsize
    return _replicate(spec, seq_len, template_index, tracer)


def _remember_shapes(store: dict, path: str):
    def hook(module, inputs, output):
        store[path] = (*(tuple(x.shape) for x in inputs), tuple(output.shape))

    return hook


def empty_graph(spec: ModelSpec, seq_len: int) -> nx.DiGraph:
    """A Graph IR with its graph attributes set and no nodes yet."""
    return nx.DiGraph(
        model=spec.name,
        spec=spec.to_dict(),
        seq_len=seq_len,
        batch=1,
        dtype_bytes=DTYPE.itemsize,
        routing="balanced",
        imbalance=1.0,
    )


def _replicate(
    spec: ModelSpec, seq_len: int, template_index: dict[str, int], tracer: _Tracer
) -> nx.DiGraph:
    """Expand the template's blocks to every layer of `spec`, with their edges."""
    graph = empty_graph(spec, seq_len)
    _renumber_segments(tracer)
    template_layers = len(template_index)
    by_layer: dict[int, list[str]] = defaultdict(list)
    for name, node in tracer.nodes.items():
        by_layer[node.layer].append(name)

    def rename(name: str, src: int, dst: int) -> str:
        return name.replace(f"layers.{src}.", f"layers.{dst}.", 1).replace(
            f"layers.{src}:", f"layers.{dst}:", 1
        )

    def template_of(i: int) -> int:
        return template_index["moe" if spec.is_moe_layer(i) else "dense"]

    def add(name: str, node: _Node, layer: int) -> None:
        if not any(getattr(node, f) for f in NODE_FIELDS):
            return  # pure views and reshapes: nothing to cost
        attrs = dataclasses.asdict(node)
        attrs["layer"] = layer
        graph.add_node(name, **attrs)

    head_layer = template_layers
    for name in by_layer[-1]:
        add(name, tracer.nodes[name], -1)
    for i in range(spec.layers):
        src = template_of(i)
        for name in by_layer[src]:
            add(rename(name, src, i), tracer.nodes[name], i)
    for name in by_layer[head_layer]:
        add(name, tracer.nodes[name], spec.layers)

    crossing = [(u, v) for u, v in tracer.edges if tracer.nodes[u].layer != tracer.nodes[v].layer]
    for u, v in tracer.edges:
        layer = tracer.nodes[u].layer
        if layer != tracer.nodes[v].layer:
            continue
        if 0 <= layer < head_layer:  # inside a block: copy into every layer of its kind
            for i in range(spec.layers):
                if template_of(i) == layer:
                    _add_edge(graph, rename(u, layer, i), rename(v, layer, i))
        else:
            _add_edge(graph, u, v)
    # Residual-stream edges between consecutive stages of the chain
    # embedding -> block 0 -> ... -> block L-1 -> head, mapped onto each block's template.
    # Every block feeds its auxiliary loss into the loss node: copied per layer. The other
    # crossing edges carry the residual stream along the chain.
    leaving = defaultdict(set)
    entering = defaultdict(set)
    for u, v in crossing:
        lu, lv = tracer.nodes[u].layer, tracer.nodes[v].layer
        if tracer.nodes[v].kind == "loss" and 0 <= lu < head_layer:
            for i in range(spec.layers):
                if template_of(i) == lu:
                    _add_edge(graph, rename(u, lu, i), v)
        else:
            leaving[lu].add(u)
            entering[lv].add(v)
    chain = [(-1, -1)] + [(template_of(i), i) for i in range(spec.layers)]
    chain.append((head_layer, spec.layers))
    for (tu, iu), (tv, iv) in zip(chain, chain[1:], strict=False):
        for u in leaving[tu]:
            for v in entering[tv]:
                src = rename(u, tu, iu) if 0 <= iu < spec.layers else u
                dst = rename(v, tv, iv) if 0 <= iv < spec.layers else v
                _add_edge(graph, src, dst)
    return graph


def _renumber_segments(tracer: _Tracer) -> None:
    """Name a container's surviving own-op runs :kind, :kind.1, ... in execution order
    (runs that were pure views cost nothing and were never recorded as nodes with cost)."""
    kept = [n for n, node in tracer.nodes.items() if any(getattr(node, f) for f in NODE_FIELDS)]
    runs: dict[str, list[str]] = defaultdict(list)
    for name in kept:  # dict order is first-seen order, i.e. execution order
        if ":" in name:
            base, _, index = name.rpartition(".")
            runs[base if index.isdigit() else name].append(name)
    renamed = {}
    for base, names in runs.items():
        for i, name in enumerate(names):
            renamed[name] = base if i == 0 else f"{base}.{i}"
    tracer.nodes = {renamed.get(n, n): tracer.nodes[n] for n in kept}
    survivors = set(kept)
    tracer.edges = {
        (renamed.get(u, u), renamed.get(v, v))
        for u, v in tracer.edges
        if u in survivors and v in survivors
    }


def _add_edge(graph: nx.DiGraph, u: str, v: str) -> None:
    if u in graph and v in graph:
        graph.add_edge(u, v)
