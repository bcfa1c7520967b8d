"""Checkpoints: atomic publication (a crash mid-write is never taken for a checkpoint),
resharding on load (FSDP2 2-way -> another sharding, -> replicated, -> one process), the
optimizer and RNG states round trip, and the manifest that finds corrupt files."""

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from tera.runtime import checkpoint
from tera.runtime.checkpoint import CheckpointError, RNGState

from .world import run_world

# DCP warns whenever it saves or loads without a process group, which these tests do on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Tensors:
    """A minimal Stateful of named tensors."""

    def __init__(self, **tensors):
        self.tensors = tensors

    def state_dict(self):
        return dict(self.tensors)

    def load_state_dict(self, state):
        self.tensors = dict(state)


class AppState:
    """Model (and optimizer) through torch.distributed.checkpoint.state_dict, whose FQNs are
    the same for plain, FSDP2 and differently sharded modules."""

    def __init__(self, model, optimizer=None):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model, optim = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optim": optim}

    def load_state_dict(self, state):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optim"],
            )


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def sharded(model: nn.Module, mesh, dim: int = 0) -> nn.Module:
    """FSDP2 over `mesh`, each parameter sharded on `dim` (dim 0 for vectors)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    def placement(param):
        return Shard(min(dim, param.ndim - 1))

    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
    return fully_shard(model, mesh=mesh, shard_placement_fn=placement)


def train(model, optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 8, generator=gen)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_params(model):
    return {name: full(p).detach().clone() for name, p in model.named_parameters()}


def as_numpy(value):
    """Tensors as numpy arrays: the harness's queue cannot carry tensors out of a rank that
    exits (torch shares their storage by file descriptor)."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: as_numpy(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(as_numpy(v) for v in value)
    return value


def optimizer_state(model, optimizer):
    """Full exp_avg / exp_avg_sq / step per parameter name."""
    names = {p: n for n, p in model.named_parameters()}
    return {
        (names[p], key): full(value).clone()
        for p, state in optimizer.state.items()
        for key, value in state.items()
    }


def save_and_reshard(rank, world_size, directory):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    model = sharded(mlp(0), mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, optimizer, 2, seed=rank)
    torch.manual_seed(100 + rank)
    random.seed(100 + rank)
    np.random.seed(100 + rank)
    checkpoint.save(directory, 2, {"app": AppState(model, optimizer), "rng": RNGState()})
    after_save = (torch.rand(3), random.random(), np.random.rand())
    saved_params = full_params(model)
    saved_optim = optimizer_state(model, optimizer)

    # Another sharding (FSDP2 over dim 1) and another initialisation: the load restores
    # the parameters and the optimizer state, so one more step matches exactly.
    other = sharded(mlp(1), mesh, dim=1)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-2)
    torch.manual_seed(7)
    checkpoint.load(directory, 2, {"app": AppState(other, other_optimizer), "rng": RNGState()})
    after_load = (torch.rand(3), random.random(), np.random.rand())
    assert other[0].weight.placements[0].dim == 1  # truly another sharding
    loaded_params = full_params(other)
    loaded_optim = optimizer_state(other, other_optimizer)
    train(model, optimizer, 1, seed=50 + rank)
    train(other, other_optimizer, 1, seed=50 + rank)

    # Replicated: a plain module on every rank.
    plain = mlp(2)
    checkpoint.load(directory, 2, {"app": AppState(plain)})
    dist.barrier()
    return as_numpy(
        {
            "saved_params": saved_params,
            "loaded_params": loaded_params,
            "saved_optim": saved_optim,
            "loaded_optim": loaded_optim,
            "stepped": (full_params(model), full_params(other)),
            "plain": full_params(plain),
            "rng": (after_save, after_load),
        }
    )


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=str(key))


def test_fsdp_checkpoint_reshards_and_round_trips_optimizer_and_rng(tmp_path):
    results = run_world(save_and_reshard, 2, str(tmp_path))
    for rank, r in enumerate(results):
        assert_same(r["saved_params"], r["loaded_params"])
        assert_same(r["saved_params"], r["plain"])
        assert len(r["saved_optim"]) == 3 * 4  # step, exp_avg, exp_avg_sq of 4 parameters
        assert_same(r["saved_optim"], r["loaded_optim"])
        assert_same(*r["stepped"])
        after_save, after_load = r["rng"]
        np.testing.assert_array_equal(after_save[0], after_load[0], err_msg=f"rank {rank}")
        assert after_save[1:] == after_load[1:], f"rank {rank} python/numpy RNG"
    assert not np.array_equal(results[0]["rng"][0][0], results[1]["rng"][0][0])  # per rank
    # The 2-rank checkpoint also loads in one process without torch.distributed.
    single = mlp(3)
    checkpoint.load(tmp_path, 2, {"app": AppState(single)})
    assert_same(results[0]["saved_params"], as_numpy(full_params(single)))
    assert json.loads((tmp_path / "step_2" / "COMPLETE").read_text())["world_size"] == 2


def test_latest_and_load_ignore_half_written_checkpoints(tmp_path):
    checkpoint.save(tmp_path, 1, {"t": Tensors(x=torch.arange(4.0))}, {"note": "first"})
    (tmp_path / "step_5.tmp").mkdir()  # a crash while DCP wrote
    (tmp_path / "step_7").mkdir()  # a crash after the rename, before the marker
    (tmp_path / "step_9").write_text("not a checkpoint")
    assert checkpoint.latest(tmp_path) == 1
    marker = checkpoint.read_marker(tmp_path, 1)
    assert marker.pop("files").keys() == {".metadata", "__0_0.distcp"}  # the manifest
    assert marker == {"step": 1, "world_size": 1, "note": "first"}
    with pytest.raises(CheckpointError, match="no complete checkpoint of step 7.*use step 1"):
        checkpoint.load(tmp_path, 7, {"t": Tensors(x=torch.zeros(4))})
    assert checkpoint.latest(tmp_path / "absent") is None


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 2, {"t": Tensors(x=torch.full((3,), 2.0))})
    real_save = checkpoint.dcp.save

    def crash_after_writing(*args, **kwargs):
        real_save(*args, **kwargs)
        raise OSError("killed")

    monkeypatch.setattr(checkpoint.dcp, "save", crash_after_writing)
    with pytest.raises(OSError, match="killed"):
        checkpoint.save(tmp_path, 4, {"t": Tensors(x=torch.full((3,), 4.0))})
    assert (tmp_path / "step_4.tmp").is_dir() and not (tmp_path / "step_4").exists()
    assert checkpoint.latest(tmp_path) == 2

    # A crash while writing the marker, after the rename: half a temporary marker on disk.
    def torn_write(path, text):
        path.with_name(path.name + ".tmp").write_text(text[: len(text) // 2])
        raise OSError("killed")

    monkeypatch.setattr(checkpoint.dcp, "save", real_save)
    monkeypatch.setattr(checkpoint, "write_atomically", torn_write)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, 4, {"t": Tensors(x=torch.full((3,), 4.0))})
    assert (tmp_path / "step_4").is_dir() and not (tmp_path / "step_4.tmp").exists()
    assert checkpoint.latest(tmp_path) == 2

    # The next save of that step replaces the debris and completes.
    monkeypatch.undo()
    checkpoint.save(tmp_path, 4, {"t": Tensors(x=torch.full((3,), 4.0))})
    assert checkpoint.latest(tmp_path) == 4
    state = Tensors(x=torch.zeros(3))
    checkpoint.load(tmp_path, 4, {"t": state})
    assert torch.equal(state.tensors["x"], torch.full((3,), 4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_4"]


def test_manifest_finds_changed_truncated_and_missing_files(tmp_path):
    checkpoint.save(tmp_path, 1, {"t": Tensors(x=torch.arange(4.0))})
    checkpoint.save(tmp_path, 2, {"t": Tensors(x=torch.arange(8.0))})
    shard = tmp_path / "step_2" / "__0_0.distcp"
    manifest = checkpoint.read_marker(tmp_path, 2)["files"]
    assert manifest[shard.name]["bytes"] == shard.stat().st_size
    checkpoint.verify(tmp_path, 2)  # as saved: passes
    original = shard.read_bytes()
    corrupt = f"checkpoint: step_2 in {str(tmp_path)!r} is corrupt: __0_0.distcp"
    fix = f"; restore the checkpoint, or delete {tmp_path / 'step_2'} to resume from step 1"

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    shard.write_bytes(flipped)
    checkpoint.verify(tmp_path, 2, contents=False)  # same size: only the contents tell
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(tmp_path, 2, {"t": Tensors(x=torch.zeros(8))})
    changed = "differs from the manifest's sha256 (its bytes changed)"
    assert str(info.value) == f"{corrupt} {changed}{fix}"

    shard.write_bytes(original[:-10])
    with pytest.raises(CheckpointError) as info:
        checkpoint.verify(tmp_path, 2, contents=False)
    n = len(original)
    assert str(info.value) == f"{corrupt} holds {n - 10} bytes, the manifest {n}{fix}"

    shard.unlink()
    with pytest.raises(CheckpointError, match="__0_0.distcp is missing; restore"):
        checkpoint.verify(tmp_path, 2, contents=False)

    (tmp_path / "step_2" / "COMPLETE").write_text('{"step": 2, "wor')  # torn marker
    with pytest.raises(CheckpointError, match="its COMPLETE marker is not JSON"):
        checkpoint.verify(tmp_path, 2)
    checkpoint.verify(tmp_path, 1)  # the earlier checkpoint is untouched
