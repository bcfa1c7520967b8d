"""The parallel layout: degrees, ZeRO stage, micro-batch, recomputation and schedule.

Layout string (DESIGN.md):
  tp=2,pp=8,vpp=4,ep=64,etp=1,cp=1,zero=1,mbs=1,recompute=selective,schedule=interleaved
dp is derived as gpus / (tp*cp*pp) and may be given to check; dp_replicate (HSDP: the
number of replicas over which sharded data parallelism is itself replicated) defaults to 1.
Unknown keys are errors.

Two keys take colon-separated lists, one entry per pipeline piece:
  partition=3:5:5:4   blocks in each of the pp*vpp virtual chunks, in chunk order (chunk c
                      runs on stage c % pp); absent: as even as possible, the first chunks
                      taking the remainder
  recompute=full:selective:none:none
                      the recompute mode of each of the pp stages; one mode applies to all
`order=tp-cp-pp-dp` maps the axes onto ranks in Megatron-LM's --use-tp-pp-dp-mapping order
instead of the default tp-cp-dp-pp (ranks.py); the layout string shows it only then.

`Layout.resolve` checks the layout against a model, a world size and a batch, and returns
the resolved layout with every key set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tera.models.spec import ModelSpec
from tera.planner.errors import InputError
from tera.planner.ranks import DEFAULT_ORDER, ORDERS, MeshShape

RECOMPUTE_MODES = ("none", "selective", "full")
SCHEDULES = ("1f1b", "interleaved")
INT_KEYS = ("tp", "pp", "vpp", "ep", "etp", "cp", "dp", "dp_replicate", "zero", "mbs")


def even_partition(layers: int, chunks: int) -> tuple[int, ...]:
    """Blocks per chunk, as even as possible; the first chunks take the remainder."""
    base, extra = divmod(layers, chunks)
    return tuple(base + (1 if c < extra else 0) for c in range(chunks))


def shown_key(text: str) -> str:
    """A key from the user as a message names it: itself when printable, else its repr,
    so that a key holding a line break cannot break the one-line error."""
    return text if text.isprintable() else repr(text)


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit also takes '²' and other digits int() refuses."""
    return text.isascii() and text.isdigit()


class LayoutError(InputError):
    """A layout that is malformed or does not fit the model, the cluster or the batch."""

    prefix = "layout."


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int = 1
    cp: int = 1
    dp: int | None = None  # derived from the world size when None
    dp_replicate: int = 1
    zero: int = 1
    mbs: int = 1
    recompute: str = "none"  # one mode, or one per stage joined by ":"
    schedule: str = "1f1b"
    partition: tuple[int, ...] | None = None  # blocks per virtual chunk; None: even
    order: str = DEFAULT_ORDER  # rank order of the axes (ranks.py): tp-cp-dp-pp | tp-cp-pp-dp

    @classmethod
    def parse(cls, text: str) -> Layout:
        """Parse `key=value,...`; every value is checked, unknown keys are refused."""
        values: dict[str, object] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or not raw:
                name = shown_key(key or item)
                raise LayoutError(name, f"{item!r} is not key=value", "write e.g. tp=2")
            if key not in known:
                known_keys = ", ".join(sorted(known))
                raise LayoutError(shown_key(key), "unknown key", f"use one of {known_keys}")
            if key in values:
                raise LayoutError(key, "given twice", "give each key once")
            if key in INT_KEYS:
                if not _is_number(raw) or int(raw) < (0 if key == "zero" else 1):
                    raise LayoutError(key, f"expected a positive integer, got {raw!r}", "fix it")
                values[key] = int(raw)
            elif key == "partition":
                sizes = raw.split(":")
                if not all(_is_number(size) and int(size) >= 1 for size in sizes):
                    raise LayoutError(
                        key, f"expected blocks per chunk like 3:5:5:4, got {raw!r}", "fix it"
                    )
                values[key] = tuple(int(size) for size in sizes)
            else:
                values[key] = raw.lower()
        layout = cls(**values)
        layout._check_values()
        return layout

    def _check_values(self) -> None:
        if self.order not in ORDERS:
            raise LayoutError(
                "order", f"unknown rank order {self.order!r}", f"use {' or '.join(ORDERS)}"
            )
        modes = self.recompute.split(":")
        for mode in modes:
            if mode not in RECOMPUTE_MODES:
                raise LayoutError(
                    "recompute", f"unknown mode {mode!r}", f"use {'|'.join(RECOMPUTE_MODES)}"
                )
        if len(modes) > 1 and len(modes) != self.pp:
            raise LayoutError(
                "recompute",
                f"{len(modes)} per-stage modes for pp={self.pp}",
                "give one mode, or one per stage",
            )
        if self.partition is not None and len(self.partition) != self.pp * self.vpp:
            raise LayoutError(
                "partition",
                f"{len(self.partition)} chunks for pp*vpp = {self.pp * self.vpp}",
                "give the blocks of each of the pp*vpp chunks",
            )
        if self.schedule not in SCHEDULES:
            raise LayoutError(
                "schedule", f"unknown schedule {self.schedule!r}", f"use {'|'.join(SCHEDULES)}"
            )
        if self.zero not in (0, 1, 2, 3):
            raise LayoutError("zero", f"stage {self.zero} does not exist", "use 0, 1, 2 or 3")
        if self.vpp > 1 and self.schedule != "interleaved":
            raise LayoutError("vpp", f"vpp={self.vpp} needs schedule=interleaved", "set both")

    def resolve(self, spec: ModelSpec, gpus: int, global_batch: int, seq_len: int) -> Layout:
        """Check divisibility against the model, the world size and the batch; fill dp.

        The checks are those a launch would fail on: heads and KV heads split by tp,
        experts by ep, layers into pp*vpp chunks, gpus by tp*cp*pp, the global batch by
        dp*mbs, the sequence by cp (and by 2*cp for load-balanced causal attention), and
        ep*etp inside the dense block tp*cp*dp_shard."""
        self._check_values()
        a = spec.attention
        block = self.tp * self.cp * self.pp
        if gpus % block:
            raise LayoutError(
                "tp",
                f"tp*cp*pp = {block} does not divide {gpus} GPUs",
                "choose degrees whose product divides the GPU count",
            )
        dp = gpus // block
        if self.dp is not None and self.dp != dp:
            raise LayoutError(
                "dp", f"dp={self.dp} but gpus/(tp*cp*pp) = {dp}", f"drop dp or set dp={dp}"
            )
        if a.heads % self.tp:
            raise LayoutError(
                "tp", f"tp={self.tp} does not divide {a.heads} heads", "choose a divisor"
            )
        if a.kind != "mla" and a.kv_heads % self.tp and self.tp % a.kv_heads:
            raise LayoutError(
                "tp",
                f"tp={self.tp} and {a.kv_heads} KV heads do not divide one another",
                "choose tp dividing kv_heads or a multiple of it",
            )
        chunks = self.pp * self.vpp
        if chunks > spec.layers:
            raise LayoutError(
                "pp", f"pp*vpp = {chunks} exceeds {spec.layers} layers", "use fewer stages"
            )
        if self.partition is not None and sum(self.partition) != spec.layers:
            raise LayoutError(
                "partition",
                f"chunks hold {sum(self.partition)} blocks, the model has {spec.layers}",
                "make the chunk sizes add up to the layer count",
            )
        if self.ep > 1 or self.etp > 1:
            if spec.moe is None:
                raise LayoutError("ep", f"{spec.name} has no experts", "use ep=1 etp=1")
            if spec.moe.experts % self.ep:
                raise LayoutError(
                    "ep",
                    f"ep={self.ep} does not divide {spec.moe.experts} experts",
                    "choose a divisor",
                )
            if spec.moe.expert_hidden % self.etp:
                raise LayoutError("etp", "etp does not divide expert_hidden", "choose a divisor")
        if dp % self.dp_replicate:
            raise LayoutError(
                "dp_replicate", f"{self.dp_replicate} does not divide dp={dp}", "choose a divisor"
            )
        dp_shard = dp // self.dp_replicate
        if (self.tp * self.cp * dp_shard) % (self.ep * self.etp):
            raise LayoutError(
                "ep",
                f"ep*etp = {self.ep * self.etp} does not divide tp*cp*dp_shard = "
                f"{self.tp * self.cp * dp_shard}",
                "lower ep or etp, or raise dp",
            )
        if global_batch % (dp * self.mbs):
            raise LayoutError(
                "mbs",
                f"global batch {global_batch} is not a multiple of dp*mbs = {dp * self.mbs}",
                "change mbs, dp or the global batch",
            )
        if seq_len % (2 * self.cp if self.cp > 1 else 1):
            raise LayoutError(
                "cp",
                f"sequence {seq_len} does not split into 2*cp = {2 * self.cp} chunks",
                "choose cp so that 2*cp divides the sequence length",
            )
        microbatches = global_batch // (dp * self.mbs)
        if self.schedule == "interleaved" and microbatches % self.pp:
            raise LayoutError(
                "schedule",
                f"interleaved needs micro-batches ({microbatches}) divisible by pp",
                "change the batch or use schedule=1f1b",
            )
        return dataclasses.replace(self, dp=dp, partition=self.chunk_sizes(spec.layers))

    def chunk_sizes(self, layers: int) -> tuple[int, ...]:
        """Blocks in each of the pp*vpp virtual chunks, in chunk order."""
        return self.partition or even_partition(layers, self.pp * self.vpp)

    @property
    def stage_recompute(self) -> tuple[str, ...]:
        """The recompute mode of each pipeline stage."""
        modes = tuple(self.recompute.split(":"))
        return modes if len(modes) == self.pp else modes * self.pp

    @property
    def dp_shard(self) -> int:
        assert self.dp is not None, "resolve() the layout first"
        return self.dp // self.dp_replicate

    @property
    def mesh(self) -> MeshShape:
        return MeshShape(
            tp=self.tp,
            cp=self.cp,
            dp_shard=self.dp_shard,
            dp_replicate=self.dp_replicate,
            pp=self.pp,
            ep=self.ep,
            etp=self.etp,
            order=self.order,
        )

    def to_dict(self) -> dict[str, object]:
        values = dataclasses.asdict(self)
        if self.partition is not None:
            values["partition"] = list(self.partition)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> Layout:
        """Inverse of `to_dict` (a resolved layout's dict gives the same layout)."""
        values = dict(values)
        if values.get("partition") is not None:
            values["partition"] = tuple(values["partition"])
        layout = cls(**values)
        layout._check_values()
        return layout

    def __str__(self) -> str:
        def text(value) -> str:
            return ":".join(map(str, value)) if isinstance(value, tuple) else str(value)

        return ",".join(
            f"{f.name}={text(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
            and not (f.name == "order" and self.order == DEFAULT_ORDER)
        )

    def brief(self) -> str:
        """The degrees people read first and the keys that differ from their defaults,
        recompute as one mode where the stages agree, and an uneven partition last: the
        short form tables print (str() is the complete, parseable form)."""
        default = Layout()
        keys = ("tp", "cp", "pp", "vpp", "ep", "etp", "dp", "dp_replicate", "zero", "mbs")
        always = ("tp", "pp", "ep", "dp", "zero", "mbs")
        text = ",".join(
            f"{k}={getattr(self, k)}"
            for k in keys
            if k in always or getattr(self, k) != getattr(default, k)
        )
        modes = set(self.stage_recompute)
        text += f",recompute={modes.pop() if len(modes) == 1 else self.recompute}"
        if self.partition and len(set(self.partition)) > 1:
            text += f",partition={':'.join(map(str, self.partition))}"
        return text
