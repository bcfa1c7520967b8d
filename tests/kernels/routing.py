"""Routings for the kernel tests: uniform, heavily skewed, one hot expert, empty experts.

Shape legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# The fixtures the tests take (the interpreter switch, poisoned allocations) hold for every
# example alike, so Hypothesis need not reset them between examples.
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SKEWS = ("uniform", "zipf", "hot", "few")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rtol, atol) of a kernel against an fp32 or fp64 reference on the same inputs: fp32 is
# accumulation-order noise, fp16 and bf16 one rounding of the output (2^-11, 2^-8) and a
# little for sums that round the other way.
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def choose_experts(T: int, E: int, K: int, skew: str, seed: int) -> torch.Tensor:
    """expert_idx_TK: K distinct experts per token, drawn with the popularity `skew`:
    uniform; zipf (popularity 1/rank^2); hot (one expert in nearly every token's choice);
    few (only max(K, E // 3) experts ever chosen, the rest get no rows). The experts'
    labels are shuffled so that the popular and the empty ones are anywhere."""
    generator = torch.Generator().manual_seed(seed)
    rank = torch.arange(E, dtype=torch.float64)
    popularity = {
        "uniform": torch.ones(E, dtype=torch.float64),
        "zipf": 1 / (rank + 1) ** 2,
        "hot": torch.where(rank == 0, 1e6, 1.0),
        "few": (rank < max(K, E // 3)).double(),
    }[skew]
    if T == 0:
        return torch.zeros(0, K, dtype=torch.int64)
    choice_TK = torch.multinomial(popularity.expand(T, E), K, generator=generator)
    return torch.randperm(E, generator=generator)[choice_TK]


@st.composite
def routings(draw, max_tokens: int = 40, max_experts: int = 10, max_k: int = 4):
    """(expert_idx_TK, E) with T = 0 .. max_tokens."""
    T = draw(st.integers(0, max_tokens))
    E = draw(st.integers(1, max_experts))
    K = draw(st.integers(1, min(E, max_k)))
    skew = draw(st.sampled_from(SKEWS))
    return choose_experts(T, E, K, skew, draw(st.integers(0, 2**31 - 1))), E


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """actual (in `dtype`) against a higher-precision reference, with the dtype's tolerance."""
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)
