"""The search space: every configuration of parallel degrees the solver may choose.

A `Config` fixes the degrees (tp, cp, ep, etp, pp, vpp, dp_replicate), the ZeRO stage, the
micro-batch size and the number of GPUs used. The rest of a layout, the assignment of
blocks to the pp*vpp chunks and the recompute mode of each stage, is decided by the
CP-SAT model (model.py) inside each configuration.

The space (each rule is what a launch needs, or a bound stated here):
  tp    divides the heads (and divides or is a multiple of the KV heads), at most the
        scale-up (NVLink) domain: tensor parallelism across the scale-out network is
        never chosen by practitioners and only enlarges the space
  cp    1 or a power of two up to MAX_CP with 2*cp dividing the sequence (causal balance)
  pp    any degree up to the layer count with tp*cp*pp dividing the GPUs; non-uniform
        partitions make every pp usable, not only divisors of the layers
  vpp   1, or 2..MAX_VPP chunks per stage with pp > 1 (interleaved schedule, which also
        needs the micro-batches divisible by pp); pp*vpp at most the layers
  ep    divides the experts and tp*cp*dp_shard (expert parallelism borrows the dense
        block's ranks); 1 for dense models
  etp   divides the expert hidden width, at most tp; 1 for dense models
  zero  0, 2 or 3; zero >= 2 only where some state is actually sharded (dp*cp > 1 or
        edp > 1), since otherwise it equals zero=0. zero=1 is left out because the cost
        model gives it zero=2's time with more memory (both reduce-scatter gradients
        and gather parameters once per step), so it can never be strictly better
  dp_replicate
        1: the cost model costs HSDP's collectives on the whole data-parallel group, so
        a replica count > 1 only adds memory and is never strictly better; pin it (or
        zero=1) to cost it anyway
  mbs   a power of two up to MAX_MBS dividing global_batch / dp
  order the rank order (ranks.py): Megatron's default tp-cp-dp-pp, or tp-cp-pp-dp where
        both pp and dp are split (elsewhere the two give the same groups); it decides
        which axes share a node, a rail or a leaf switch
User pins (`--fix tp=2,ep=8`) restrict a key to one value and override the tp and cp caps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from tera.models.spec import ModelSpec
from tera.planner.layout import INT_KEYS, Layout, LayoutError, shown_key
from tera.planner.ranks import DEFAULT_ORDER, ORDERS

MAX_CP = 8
MAX_VPP = 8
MAX_MBS = 8
PINNABLE = ("tp", "cp", "pp", "vpp", "ep", "etp", "zero", "dp_replicate", "mbs", "gpus", "order")


@dataclass(frozen=True, order=True)
class Config:
    """One choice of degrees, ZeRO stage, micro-batch, GPU count and rank order."""

    gpus: int
    tp: int
    cp: int
    pp: int
    vpp: int
    ep: int
    etp: int
    zero: int
    dp_replicate: int
    mbs: int
    order: str = DEFAULT_ORDER

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.cp * self.pp)

    @property
    def schedule(self) -> str:
        return "interleaved" if self.vpp > 1 else "1f1b"

    def layout(self, partition: tuple[int, ...] | None = None, recompute: str = "none") -> Layout:
        return Layout(
            tp=self.tp,
            pp=self.pp,
            vpp=self.vpp,
            ep=self.ep,
            etp=self.etp,
            cp=self.cp,
            dp_replicate=self.dp_replicate,
            zero=self.zero,
            mbs=self.mbs,
            recompute=recompute,
            schedule=self.schedule,
            partition=partition,
            order=self.order,
        )

    def key(self) -> str:
        """A short human-readable name, e.g. tp2 cp1 pp8 vpp1 ep32 etp1 zero1 mbs1."""
        text = f"tp{self.tp} cp{self.cp} pp{self.pp} vpp{self.vpp} ep{self.ep} etp{self.etp}"
        text += f" zero{self.zero} mbs{self.mbs}"
        if self.dp_replicate > 1:
            text += f" dp_replicate{self.dp_replicate}"
        if self.order != DEFAULT_ORDER:
            text += f" order {self.order}"
        return text


def divisors(n: int, limit: int | None = None) -> list[int]:
    return [d for d in range(1, (limit or n) + 1) if n % d == 0]


def parse_pins(text: str | None) -> dict[str, int | str]:
    """`tp=2,ep=8` -> {"tp": 2, "ep": 8}; the searchable keys (order takes a rank order)."""
    pins: dict[str, int | str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, _, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if key not in PINNABLE:
            raise LayoutError(
                shown_key(key), "cannot be pinned", f"pin one of {', '.join(PINNABLE)}"
            )
        if key == "order":
            if raw not in ORDERS:
                raise LayoutError(key, f"unknown rank order {raw!r}", f"use {' or '.join(ORDERS)}")
            pins[key] = raw
            continue
        if not (raw.isascii() and raw.isdigit()) or int(raw) < (0 if key == "zero" else 1):
            raise LayoutError(key, f"expected a positive integer, got {raw!r}", "fix --fix")
        pins[key] = int(raw)
    assert set(PINNABLE) - {"gpus", "order"} <= set(INT_KEYS)
    return pins


@dataclass(frozen=True)
class Space:
    spec: ModelSpec
    gpu_counts: tuple[int, ...]  # GPU counts the search may use (one, unless minimising cost)
    global_batch: int
    seq_len: int
    scaleup_domain: int
    pins: dict[str, int] = field(default_factory=dict)

    def _options(self, key: str, values: list[int], valid=None) -> list[int]:
        """The values of `key` to try: the pinned one where it is valid (a pin may pass
        the space's caps, not the model's divisibility), else `values`."""
        if key in self.pins:
            pinned = self.pins[key]
            return [pinned] if valid is None or valid(pinned) else []
        return values

    def configs(self) -> Iterator[Config]:
        """Every configuration of the space; each resolves (tests check it)."""
        spec, a, moe = self.spec, self.spec.attention, self.spec.moe
        tps = self._options(
            "tp",
            [
                t
                for t in divisors(a.heads, min(a.heads, self.scaleup_domain))
                if a.kind == "mla" or a.kv_heads % t == 0 or t % a.kv_heads == 0
            ],
        )
        cps = self._options(
            "cp",
            [c for c in (1, 2, 4, 8) if c <= MAX_CP and (c == 1 or self.seq_len % (2 * c) == 0)],
        )
        for gpus in self._options("gpus", list(self.gpu_counts)):
            for tp in tps:
                for cp in cps:
                    yield from self._configs(gpus, tp, cp, spec, moe)

    def _configs(self, gpus: int, tp: int, cp: int, spec: ModelSpec, moe) -> Iterator[Config]:
        if gpus % (tp * cp):
            return
        ranks = gpus // (tp * cp)
        pps = divisors(ranks, spec.layers)
        for pp in self._options("pp", pps, lambda p: p in pps):
            dp = gpus // (tp * cp * pp)
            for mbs in self._options("mbs", [b for b in (1, 2, 4, 8) if b <= MAX_MBS]):
                if self.global_batch % (dp * mbs):
                    continue
                microbatches = self.global_batch // (dp * mbs)

                def vpp_ok(v: int, pp=pp, microbatches=microbatches) -> bool:
                    interleaved = pp > 1 and pp * v <= spec.layers and microbatches % pp == 0
                    return v == 1 or interleaved

                vpps = [v for v in range(1, MAX_VPP + 1) if vpp_ok(v)]
                for vpp in self._options("vpp", vpps, vpp_ok):
                    yield from self._expert_configs(gpus, tp, cp, pp, vpp, mbs, dp, moe)

    def _expert_configs(self, gpus, tp, cp, pp, vpp, mbs, dp, moe) -> Iterator[Config]:
        eps = [1] if moe is None else divisors(moe.experts)
        etps = [1] if moe is None else divisors(moe.expert_hidden, tp)
        all_etps = [1] if moe is None else divisors(moe.expert_hidden)
        for zero in self._options("zero", [0, 2, 3], lambda z: z in (0, 1, 2, 3)):
            replicas = divisors(dp) if zero == 3 else [1]
            for dp_replicate in self._options("dp_replicate", [1], replicas.__contains__):
                block = tp * cp * dp // dp_replicate
                for ep in self._options("ep", eps, eps.__contains__):
                    for etp in self._options("etp", etps, all_etps.__contains__):
                        if block % (ep * etp):
                            continue
                        sharded = dp * cp > 1 or block // (ep * etp) * dp_replicate > 1
                        if zero >= 1 and not sharded:
                            continue
                        # the orders differ only where both pp and dp are split
                        orders = list(ORDERS) if pp > 1 and dp > 1 else [DEFAULT_ORDER]
                        for order in self._options("order", orders, ORDERS.__contains__):
                            yield Config(
                                gpus, tp, cp, pp, vpp, ep, etp, zero, dp_replicate, mbs, order
                            )

    def resolve(self, config: Config, partition=None, recompute: str = "none") -> Layout:
        """The config as a resolved layout (the space's rules are Layout.resolve's)."""
        layout = config.layout(partition, recompute)
        return layout.resolve(self.spec, config.gpus, self.global_batch, self.seq_len)
