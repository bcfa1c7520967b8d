"""Fast multi-rank worlds for tests: `run_world(fn, world_size, *args)`, the plans they
run, `tiny_plan(layout, gpus)`, and their data, `tiny_batch(step, plan)`.

Runs `fn(rank, world_size, *args)` on `world_size` processes joined in one gloo process
group and returns the per-rank return values, in rank order. A rank that raises (or dies)
fails the whole world with that rank's traceback.

Speed: the processes come from a multiprocessing "forkserver" whose server imported torch
and tera's runtime once, so a rank starts by forking a warm interpreter instead of
importing them again (2.6 s of wall time per import here). Measured on the 2-core
development machine: the first world of a session takes 2.5 s (the server starting), then
a world of 8 ranks that join the gloo group, all-reduce and return takes 0.2 s from call
to return.

`tiny_plan` builds a checked Plan (tera.planner.plan.Plan.build, with the cost model's
prediction) for tiny-moe on the local-cpu cluster, fp32, from a layout string; plans are
small and pickle, so build them in the test process and pass them to the ranks.
`tiny_batch` is a step's global batch [global_batch, seq_len + 1] of random tokens, the
same under every layout; data-parallel rank r takes rows [r*B/dp, (r+1)*B/dp), as
tera.runtime.data.TokenStream does.

Invariants:
  - `fn` is a module-level function (the forkserver imports it by name) and its return
    value pickles;
  - each world gets a fresh rendezvous (a FileStore in its own temporary directory), so
    worlds never see each other's keys;
  - every rank runs with one torch thread (2 cores are shared by up to 8 ranks) and
    destroys its process group before returning.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import queue
import tempfile
import time
import traceback

# What the server imports once. pytest too: multiprocessing re-runs the main script (the
# `pytest` entry point) in every rank, which is then cheap.
PRELOAD = ["torch", "torch.distributed", "tera.planner.plan", "tera.runtime.trainer", "pytest"]
_context = None


TINY_BATCH, TINY_SEQ = 8, 32  # 5 steps of tiny-moe take about a second per layout


@functools.cache
def tiny_plan(layout: str, gpus: int, global_batch: int = TINY_BATCH, seq_len: int = TINY_SEQ):
    """A Plan for tiny-moe, fp32, on `gpus` local-cpu ranks with `layout`."""
    from tera.models import load_spec
    from tera.planner import evaluate
    from tera.planner.layout import Layout
    from tera.planner.plan import Plan
    from tera.topologies import load

    spec, cluster = load_spec("tiny-moe"), load("local-cpu", gpus=gpus)
    prediction = evaluate(spec, cluster, layout, global_batch, seq_len, precision="fp32")
    resolved = Layout.parse(layout).resolve(spec, gpus, global_batch, seq_len)
    return Plan.build(spec, cluster, resolved, global_batch, seq_len, "fp32", prediction.to_dict())


def tiny_batch(step: int, plan):
    """The global batch of `step` for `plan`'s model, batch and sequence."""
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, plan.spec.vocab, (plan.global_batch, plan.seq_len + 1), generator=g)


class WorldError(RuntimeError):
    """A rank of a world failed; the message holds its traceback."""


def _ctx():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _rank_main(fn, rank: int, world_size: int, store_path: str, results, args) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no network needed
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Pickled here, by value: multiprocessing's own pickler would share tensors
        # through file descriptors that die with this process.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # report every failure, KeyboardInterrupt included
        results.put((rank, False, traceback.format_exc()))


def run_world(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return their values."""
    ctx = _ctx()
    with tempfile.TemporaryDirectory(prefix="tera-world-") as tmp:
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, rank, world_size, os.path.join(tmp, "store"), results, args),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            values = _collect(procs, results, world_size, timeout)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
    return values


def _collect(procs, results, world_size: int, timeout: float) -> list:
    values: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    while len(values) < world_size:
        try:
            rank, ok, value = results.get(timeout=0.2)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:  # killed (a signal, out of memory) before it could report
                code = procs[dead[0]].exitcode
                raise WorldError(f"rank {dead[0]} died with exit code {code}") from None
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(values))
                raise WorldError(f"ranks {missing} did not finish in {timeout:.0f} s") from None
            continue
        if not ok:
            raise WorldError(f"rank {rank} failed:\n{value}")
        values[rank] = pickle.loads(value)
    return [values[r] for r in range(world_size)]
