"""TokenStream: determinism, data-parallel sharding, resume, token-file dtype rules, errors."""

import json

import numpy as np
import pytest
import torch

from tera.runtime.data import DataError, TokenStream, file_dtype

VOCAB, SEQ, BATCH = 97, 8, 8


def stream(source="synthetic", dp_rank=0, dp_size=1, seed=0, vocab=VOCAB, seq=SEQ, batch=BATCH):
    return TokenStream(source, vocab, seq, batch, dp_rank, dp_size, seed)


def write_tokens(path, tokens, dtype=np.uint16, sidecar=None):
    np.asarray(tokens, dtype=dtype).tofile(path)
    if sidecar is not None:
        path.with_name(path.name + ".json").write_text(json.dumps({"dtype": sidecar}))
    return path


@pytest.fixture
def token_file(tmp_path):
    return write_tokens(tmp_path / "tokens.bin", np.arange(100) % VOCAB)


def test_synthetic_batches_are_deterministic_and_differ_by_step_and_seed():
    a, b = stream(), stream()
    first = [a.next_batch() for _ in range(3)]
    assert all(torch.equal(x, b.next_batch()) for x in first)
    assert first[0].shape == (BATCH, SEQ + 1) and first[0].dtype == torch.int64
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], stream(seed=1).next_batch())
    # Any step is produced directly, without replaying the earlier ones.
    assert torch.equal(stream().batch_at(2), first[2])


def test_synthetic_rows_follow_their_progression():
    batch = stream().next_batch()
    assert int(batch.min()) >= 0 and int(batch.max()) < VOCAB
    nxt = (2 * batch[:, 1:-1] - batch[:, :-2]) % VOCAB  # x_{t+1} = 2 x_t - x_{t-1} mod V
    assert torch.equal(nxt, batch[:, 2:])
    assert len({int(r[1] - r[0]) % VOCAB for r in batch}) > 1  # the stride varies by row


@pytest.mark.parametrize("source", ["synthetic", "file"])
@pytest.mark.parametrize("dp", [2, 4, 8])
def test_dp_shards_concatenate_to_the_one_rank_batch(source, dp, token_file):
    source = token_file if source == "file" else source
    whole = stream(source)
    shards = [stream(source, r, dp) for r in range(dp)]
    for _ in range(3):
        expected = whole.next_batch()
        got = torch.cat([s.next_batch() for s in shards])
        assert torch.equal(got, expected)
    assert shards[1].local_batch == BATCH // dp


@pytest.mark.parametrize("source", ["synthetic", "file"])
def test_resume_gives_the_identical_next_batches(source, token_file):
    source = token_file if source == "file" else source
    straight = stream(source)
    batches = [straight.next_batch() for _ in range(5)]
    first = stream(source)
    for _ in range(2):
        first.next_batch()
    state = first.state_dict()
    # Resharded on resume: the position is global, so another dp size continues it too.
    resumed = [stream(source, r, 2) for r in range(2)]
    for s in resumed:
        s.load_state_dict(state)
    for expected in batches[2:]:
        assert torch.equal(torch.cat([s.next_batch() for s in resumed]), expected)


def test_resume_refuses_another_stream():
    state = stream().state_dict()
    with pytest.raises(DataError, match="seed"):
        stream(seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="global_batch"):
        stream(batch=4).load_state_dict(state)


def test_file_windows_are_consecutive_and_wrap_with_an_epoch(tmp_path):
    tokens = np.arange(41) % VOCAB  # 41 tokens: (41 - 1) // 8 = 5 windows of 9
    path = write_tokens(tmp_path / "t.bin", tokens)
    s = stream(path, batch=4)
    first = s.next_batch()
    for row in range(4):
        assert first[row].tolist() == tokens[row * SEQ : row * SEQ + SEQ + 1].tolist()
    assert s.epoch == 0
    second = s.next_batch()  # samples 4..7 are windows 4, 0, 1, 2
    assert second[0].tolist() == tokens[32:41].tolist()
    assert torch.equal(second[1:], first[:3])
    assert s.epoch == 1


def test_file_dtype_rule_sidecar_then_vocabulary(tmp_path):
    path = tmp_path / "t.bin"
    assert file_dtype(path, 65536) == np.uint16
    assert file_dtype(path, 65537) == np.uint32
    path.with_name("t.bin.json").write_text('{"dtype": "uint32"}')
    assert file_dtype(path, 100) == np.uint32


def test_uint32_file_with_sidecar_reads_large_ids(tmp_path):
    tokens = np.arange(70000, 70100)
    path = write_tokens(tmp_path / "t.bin", tokens, np.uint32, sidecar="uint32")
    batch = stream(path, vocab=100_000, batch=2).next_batch()
    assert batch[0].tolist() == tokens[: SEQ + 1].tolist()
    # Without the sidecar a vocabulary over 65536 also means uint32.
    path.with_name("t.bin.json").unlink()
    assert torch.equal(stream(path, vocab=100_000, batch=2).next_batch(), batch)


def test_file_errors_name_the_field_and_the_fix(tmp_path):
    with pytest.raises(DataError, match="--data: .*not found; pass --data synthetic"):
        stream(tmp_path / "missing.bin")
    big = write_tokens(tmp_path / "big.bin", [1, 2, 3, VOCAB + 5] + [0] * 20)
    with pytest.raises(DataError, match=f"token {VOCAB + 5} at index 3, outside"):
        stream(big)
    short = write_tokens(tmp_path / "short.bin", [1, 2, 3])
    with pytest.raises(DataError, match="holds 3 tokens, fewer than one sequence"):
        stream(short)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match="3 bytes, not a whole number of uint16"):
        stream(odd)
    bad = write_tokens(tmp_path / "bad.bin", [0] * 20, sidecar="int8")
    with pytest.raises(DataError, match="names dtype 'int8'"):
        stream(bad)
    narrow = write_tokens(tmp_path / "narrow.bin", [0] * 20, sidecar="uint16")
    with pytest.raises(DataError, match="uint16 cannot hold"):
        stream(narrow, vocab=70000)


def test_sharding_errors():
    with pytest.raises(DataError, match="global_batch: 8 does not divide among 3"):
        stream(dp_size=3)
    with pytest.raises(DataError, match="dp_rank"):
        stream(dp_rank=2, dp_size=2)
