"""The pipeline schedule as a timeline: when each forward and backward of each micro-batch
runs on each stage, found by simulating the schedule's dependency order.

Each stage runs its ops in the fixed order of Megatron-LM's schedules (`stage_order`):
1F1B for vpp = 1 (pp - stage - 1 warm-up forwards, then one forward and one backward in
turn, then the remaining backwards) and the interleaved 1F1B for vpp > 1 (warm-up of
2*(pp - stage - 1) + (vpp - 1)*pp virtual micro-batches, micro-batches taken in groups of
pp per chunk: Megatron's `get_model_chunk_id`). An op starts as soon as its stage is free
and its input is ready:
  forward  of global chunk g (g = local chunk * pp + stage) needs the same micro-batch's
           forward of chunk g - 1 (on the previous stage);
  backward of chunk g needs the backward of chunk g + 1 (on the next stage), or, for the
           last chunk, its own forward (the loss).
Communication is inside the op durations (the cost model counts a stage's pipeline
send/recv in its time), so an op may start the instant its input's op ends. Bubbles are
the idle time this leaves; nothing is placed by hand.

Invariants: every op runs exactly once; no two ops of a stage overlap; every op starts no
earlier than the ops it depends on end; with equal stage times the 1F1B makespan is
(m + pp - 1)(f + b) and the interleaved one m(f + b) + (pp - 1)(f + b)/vpp.
"""

from __future__ import annotations

from dataclasses import dataclass

FORWARD, BACKWARD = "F", "B"


@dataclass(frozen=True)
class Op:
    kind: str  # FORWARD | BACKWARD
    microbatch: int
    chunk: int  # the stage's local chunk, 0 .. vpp-1 (global chunk: chunk * pp + stage)


@dataclass(frozen=True)
class Slot:
    """One op placed on the timeline (seconds from the start of the step)."""

    stage: int
    op: Op
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    stages: int
    vpp: int
    microbatches: int
    slots: tuple[Slot, ...]  # in the order they were placed

    @property
    def makespan(self) -> float:
        return max(slot.end for slot in self.slots)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all stages' time between 0 and the makespan."""
        busy = sum(s.end - s.start for s in self.slots)
        return 1 - busy / (self.stages * self.makespan)


def stage_order(stage: int, stages: int, vpp: int, microbatches: int) -> list[Op]:
    """The ops of `stage` in the order Megatron-LM's schedule runs them."""
    if vpp > 1 and microbatches % stages:
        raise ValueError(f"interleaved needs micro-batches ({microbatches}) divisible by pp")
    total = microbatches * vpp  # virtual micro-batches: one per (micro-batch, chunk)
    if vpp == 1:
        warmup = min(stages - stage - 1, total)
    else:
        warmup = min(2 * (stages - stage - 1) + (vpp - 1) * stages, total)

    def op(kind: str, k: int) -> Op:
        # Megatron's get_model_chunk_id: groups of pp micro-batches sweep chunk by chunk,
        # forwards from the first chunk, backwards from the last.
        group, within = divmod(k, stages * vpp)
        chunk = within // stages
        if kind == BACKWARD:
            chunk = vpp - 1 - chunk
        return Op(kind, group * stages + within % stages, chunk)

    forwards = [op(FORWARD, k) for k in range(total)]
    backwards = [op(BACKWARD, k) for k in range(total)]
    order = forwards[:warmup]
    for k in range(total - warmup):
        order += [forwards[warmup + k], backwards[k]]
    return order + backwards[total - warmup :]


def simulate(
    forward: list[list[float]], backward: list[list[float]], microbatches: int
) -> Timeline:
    """Place every op. forward[s][k] and backward[s][k] are the seconds per micro-batch of
    local chunk k on stage s (CostModel.chunk_times)."""
    stages, vpp = len(forward), len(forward[0])
    orders = [stage_order(s, stages, vpp, microbatches) for s in range(stages)]
    last_chunk = stages * vpp - 1
    ends: dict[tuple[str, int, int], float] = {}  # (kind, micro-batch, global chunk) -> end
    free = [0.0] * stages
    position = [0] * stages
    slots: list[Slot] = []

    def dependencies(op: Op, g: int) -> list[tuple[str, int, int]]:
        if op.kind == FORWARD:
            return [(FORWARD, op.microbatch, g - 1)] if g > 0 else []
        if g == last_chunk:
            return [(FORWARD, op.microbatch, g)]
        return [(BACKWARD, op.microbatch, g + 1), (FORWARD, op.microbatch, g)]

    remaining = sum(len(order) for order in orders)
    while remaining:
        placed = 0
        for s in range(stages):
            while position[s] < len(orders[s]):
                op = orders[s][position[s]]
                g = op.chunk * stages + s
                needs = dependencies(op, g)
                if any(need not in ends for need in needs):
                    break  # the next op waits for another stage; try the others
                start = max([free[s]] + [ends[need] for need in needs])
                seconds = (forward if op.kind == FORWARD else backward)[s][op.chunk]
                end = start + seconds
                ends[(op.kind, op.microbatch, g)] = end
                free[s] = end
                slots.append(Slot(s, op, start, end))
                position[s] += 1
                placed += 1
        if not placed:  # each stage waits on another: the order itself is wrong
            raise RuntimeError("pipeline schedule deadlocks; stage orders are inconsistent")
        remaining -= placed
    return Timeline(stages, vpp, microbatches, tuple(slots))
