"""Training data: a deterministic synthetic stream and memory-mapped token files, sharded
across data-parallel ranks and resumable.

`TokenStream(source, vocab, seq_len, global_batch, dp_rank, dp_size, seed)` yields one
batch per training step. Invariants:
  - Every step has one global batch of `global_batch` rows of `seq_len + 1` tokens (inputs
    are [:, :-1], targets [:, 1:]). Data-parallel rank r of dp gets rows
    [r*B/dp, (r+1)*B/dp), so the concatenation of the dp shards in rank order is the global
    batch and every layout of the same model sees the same data.
  - Row i of step s depends only on (source, seed, s, i): any step can be produced without
    replaying the earlier ones, and the global batch does not depend on dp.
  - The position is the number of batches taken; `state_dict()` / `load_state_dict()`
    hold it, so a resumed stream returns the batches an uninterrupted one would. The state
    also records what defines the stream (seed, batch, sequence length, vocabulary, and
    "synthetic" or the file's name and token count) and refuses to resume a different
    stream. It holds no dp rank or size: a checkpoint resumes under another layout.

Synthetic source ("synthetic"): each row is an arithmetic progression modulo the vocabulary,
x_t = (start + t * stride) mod vocab, with start uniform in [0, vocab) and stride uniform
in [1, min(16, vocab - 1)], drawn from a torch.Generator seeded by (seed, step, row). The
structure is learnable (from two tokens on, x_{t+1} = 2 x_t - x_{t-1} mod vocab) while the
first two tokens of a row carry no information. Measured: tiny-moe (fp32, one process,
plain AdamW at lr 3e-3, 8 rows of 33 tokens per step) goes from a loss of 7.65 (about
ln 2048) to 6.07 in 150 steps.

Token files (any other source): a flat little-endian array of token ids without header,
read with numpy.memmap. The dtype is the one named by a sidecar `<file>.json` holding
{"dtype": "uint16" | "uint32"} when there is one, else uint16 when vocab <= 65536 and
uint32 otherwise (a uint32 file for a small vocabulary therefore needs the sidecar). A
file whose size is not a whole number of tokens, that is shorter than one sequence, or
that holds a token >= vocab is refused with a DataError naming the file and the fix;
opening a file scans it once for its largest token. Sample g = step * global_batch + row
is window (g mod n) of the n = (N - 1) // seq_len windows of seq_len + 1 consecutive tokens
starting at multiples of seq_len (consecutive windows share one token, so every token but
the first is a target once per epoch); the data wraps around at the end, and
`epoch = g // n` counts the passes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tera.planner.errors import InputError

SYNTHETIC = "synthetic"
MAX_STRIDE = 16  # largest step of a synthetic progression
UINT16_VOCAB = 2**16  # vocabularies up to this size fit uint16 token ids
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
SCAN_TOKENS = 1 << 24  # tokens per chunk when scanning a file for its largest token
_MASK64 = (1 << 64) - 1


class DataError(InputError):
    """A data source that cannot be read as asked; the message names the field and the fix."""


def _splitmix64(x: int) -> int:
    """One round of SplitMix64 (Steele et al. 2014): a bijective 64-bit mix, so that nearby
    (seed, step, row) triples give unrelated generator seeds."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, step: int, row: int) -> int:
    """The generator seed of one synthetic row (63 bits: manual_seed takes a signed int64)."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ step) ^ row) >> 1


def synthetic_row(vocab: int, length: int, seed: int, step: int, row: int) -> torch.Tensor:
    """Row `row` of step `step`: an arithmetic progression mod vocab of `length` tokens."""
    gen = torch.Generator().manual_seed(row_seed(seed, step, row))
    start = torch.randint(0, vocab, (1,), generator=gen)
    stride = torch.randint(1, max(2, min(MAX_STRIDE, vocab - 1) + 1), (1,), generator=gen)
    return (start + stride * torch.arange(length)) % vocab


class TokenFile:
    """A memory-mapped token file, checked against the vocabulary (see the module docstring)."""

    def __init__(self, path: str | Path, vocab: int, seq_len: int):
        self.path = Path(path)
        fix = "pass --data synthetic or the path of a .bin token file"
        if not self.path.is_file():
            problem = "is a directory" if self.path.is_dir() else "not found"
            raise DataError("--data", f"{str(self.path)!r} {problem}", fix)
        self.dtype = file_dtype(self.path, vocab)
        itemsize = np.dtype(self.dtype).itemsize
        size = self.path.stat().st_size
        if size % itemsize:
            raise DataError(
                "--data",
                f"{str(self.path)!r} has {size} bytes, not a whole number of "
                f"{np.dtype(self.dtype).name} tokens",
                "write the file as a flat array of token ids, or name its dtype in a sidecar "
                f"{self.path.name}.json",
            )
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r") if size else np.empty(0)
        n = len(self.tokens)
        if n < seq_len + 1:
            raise DataError(
                "--data",
                f"{str(self.path)!r} holds {n} tokens, fewer than one sequence of "
                f"seq_len + 1 = {seq_len + 1}",
                "use a longer file or a plan with a shorter seq_len",
            )
        for first in range(0, n, SCAN_TOKENS):
            chunk = self.tokens[first : first + SCAN_TOKENS]
            if int(chunk.max()) >= vocab:
                index = first + int(np.argmax(chunk >= vocab))
                raise DataError(
                    "--data",
                    f"{str(self.path)!r} holds token {int(self.tokens[index])} at index {index}, "
                    f"outside the model's vocabulary of {vocab}",
                    "tokenize for this model, or check the dtype (a sidecar "
                    f'{self.path.name}.json with {{"dtype": "uint32"}} for 32-bit ids)',
                )
        self.seq_len = seq_len
        self.windows = (n - 1) // seq_len
        # Names the data in checkpoints without its directory, so that a moved file resumes.
        self.identity = f"file:{self.path.name}:{n}"

    def window(self, index: int) -> torch.Tensor:
        first = (index % self.windows) * self.seq_len
        return torch.from_numpy(self.tokens[first : first + self.seq_len + 1].astype(np.int64))


def file_dtype(path: Path, vocab: int):
    """The token dtype of a file: its sidecar's, else the smallest that holds the vocabulary."""
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        return np.uint16 if vocab <= UINT16_VOCAB else np.uint32
    fix = f'write {{"dtype": "uint16"}} or {{"dtype": "uint32"}} in {sidecar.name}'
    try:
        name = json.loads(sidecar.read_text()).get("dtype")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError("--data", f"cannot read the sidecar {str(sidecar)!r} ({exc})", fix) from exc
    if name not in DTYPES:
        raise DataError("--data", f"sidecar {str(sidecar)!r} names dtype {name!r}", fix)
    dtype = DTYPES[name]
    if vocab - 1 > np.iinfo(dtype).max:
        raise DataError(
            "--data", f"{name} cannot hold the ids of a vocabulary of {vocab}", "use uint32"
        )
    return dtype


class TokenStream:
    """Batches of this data-parallel rank, one per step (see the module docstring)."""

    def __init__(
        self,
        source: str | Path,
        vocab: int,
        seq_len: int,
        global_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
    ):
        for name, value in (("vocab", vocab), ("seq_len", seq_len), ("global_batch", global_batch)):
            if value < 1:
                raise DataError(name, f"must be positive, got {value}", "fix the plan")
        if global_batch % dp_size:
            raise DataError(
                "global_batch",
                f"{global_batch} does not divide among {dp_size} data-parallel ranks",
                "use a multiple of dp",
            )
        if not 0 <= dp_rank < dp_size:
            raise DataError("dp_rank", f"{dp_rank} is not in [0, {dp_size})", "fix the mesh")
        self.source = str(source)
        self.vocab, self.seq_len, self.global_batch, self.seed = vocab, seq_len, global_batch, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.file = None if self.source == SYNTHETIC else TokenFile(source, vocab, seq_len)
        self.step = 0  # batches taken

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.dp_size

    @property
    def epoch(self) -> int:
        """Passes over a token file completed before the next batch (0 for synthetic data)."""
        if self.file is None:
            return 0
        return self.step * self.global_batch // self.file.windows

    def batch_at(self, step: int) -> torch.Tensor:
        """This rank's rows of the global batch of `step`: LongTensor [B/dp, seq_len + 1]."""
        first = self.dp_rank * self.local_batch
        rows = range(first, first + self.local_batch)
        if self.file is None:
            length = self.seq_len + 1
            out = [synthetic_row(self.vocab, length, self.seed, step, row) for row in rows]
        else:
            out = [self.file.window(step * self.global_batch + row) for row in rows]
        return torch.stack(out)

    def next_batch(self) -> torch.Tensor:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    @property
    def identity(self) -> str:
        """Names the data: "synthetic", or "file:<name>:<tokens>" for a token file."""
        return SYNTHETIC if self.file is None else self.file.identity

    # ---- Stateful ------------------------------------------------------------------------
    def _defining(self) -> dict:
        return {
            "source": self.identity,
            "seed": self.seed,
            "vocab": self.vocab,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
        }

    def state_dict(self) -> dict:
        return {"step": self.step, **self._defining()}

    def load_state_dict(self, state: dict) -> None:
        for key, value in self._defining().items():
            if state[key] != value:
                raise DataError(
                    key,
                    f"the checkpoint's stream has {key} {state[key]!r}, this one {value!r}",
                    "resume with the data, seed and plan sizes the checkpoint was written with",
                )
        self.step = int(state["step"])
