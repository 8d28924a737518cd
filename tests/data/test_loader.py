"""TokenLoader: ranks partition the global batch, no token repeated or skipped per epoch, exact resume."""
import numpy as np
import pytest
import torch

from pgolf import BOS_ID
from pgolf.data.loader import TokenLoader, load_validation_tokens
from pgolf.data.shards import ShardError, write_shard

SIZES = (1000, 1537, 777)  # awkward shard sizes; the total (3314) is no multiple of any batch


@pytest.fixture
def stream(tmp_path):
    """Three train shards whose concatenation is 2, 3, 4, ...: every token names its position."""
    tokens = np.arange(sum(SIZES)) + 2
    pos = 0
    for i, n in enumerate(SIZES):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", tokens[pos:pos + n])
        pos += n
    return str(tmp_path / "fineweb_train_*.bin"), tokens


def _take(loader, steps):
    return [loader.next_batch() for _ in range(steps)]


def test_batches_are_shifted_windows(stream):
    pattern, tokens = stream
    B, T = 3, 17
    with TokenLoader(pattern, B, T) as loader:
        batches = _take(loader, 80)  # several epochs
    assert not loader.pin_memory or torch.cuda.is_available()
    pos = 0
    for x, y in batches:
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            expect = tokens[np.arange(pos, pos + T + 1) % len(tokens)]
            assert row_x.tolist() == expect[:-1].tolist() and row_y.tolist() == expect[1:].tolist()
            pos += T
    # one epoch: every token is an input exactly once
    inputs = torch.cat([x.reshape(-1) for x, _ in batches]).numpy()[: len(tokens)]
    assert np.array_equal(np.sort(inputs), tokens)


@pytest.mark.parametrize("kwargs", [{}, {"packing": True}, {"sampler": "coprime", "seed": 3}])
def test_two_ranks_cover_world_one(stream, kwargs, tmp_path):
    pattern, tokens = stream
    if kwargs.get("packing"):  # documents of varying length: BOS every few dozen tokens
        pattern = str(tmp_path / "docs_*.bin")
        rng = np.random.default_rng(0)
        docs = np.where(rng.random(3314) < 0.04, BOS_ID, tokens)
        write_shard(tmp_path / "docs_000000.bin", docs[:2000])
        write_shard(tmp_path / "docs_000001.bin", docs[2000:])
    B, T, steps = 2, 13, 70
    world1 = TokenLoader(pattern, 2 * B, T, **kwargs)
    ranks = [TokenLoader(pattern, B, T, rank=r, world_size=2, **kwargs) for r in range(2)]
    for _ in range(steps):
        x, y = world1.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    for loader in ranks + [world1]:
        loader.close()


def test_coprime_sampler_visits_every_row_once_per_epoch(stream):
    pattern, tokens = stream
    T = 16
    n_rows = (len(tokens) - 1) // T
    with TokenLoader(pattern, 1, T, sampler="coprime", seed=1) as loader:
        firsts = [int(loader.next_batch()[0][0, 0]) - 2 for _ in range(2 * n_rows)]
    epoch0, epoch1 = firsts[:n_rows], firsts[n_rows:]
    assert sorted(epoch0) == sorted(epoch1) == [k * T for k in range(n_rows)]
    assert epoch0 != sorted(epoch0) and epoch0 != epoch1  # shuffled, differently per epoch
    assert loader.epoch == 2


def test_packing_starts_rows_at_bos(tmp_path):
    T = 32
    doc_lens = np.random.default_rng(1).integers(5, 50, size=200)
    docs = np.concatenate([np.r_[BOS_ID, np.full(n - 1, 7)] for n in doc_lens])
    docs = np.where(docs == BOS_ID, BOS_ID, np.arange(len(docs)) + 2)  # non-BOS tokens name their position
    write_shard(tmp_path / "s.bin", docs)
    with TokenLoader(tmp_path / "s.bin", 4, T, packing=True, bos_window=50) as loader:
        rows = torch.cat([loader.next_batch()[0] for _ in range(25)])
    assert bool((rows[:, 0] == BOS_ID).all())  # documents are shorter than the window: always a BOS
    body = rows[rows != BOS_ID]
    assert body.unique().numel() == body.numel()  # within the epoch no token is used twice
    with TokenLoader(tmp_path / "s.bin", 4, T, packing=True) as loader:  # window T: most rows
        rows = torch.cat([loader.next_batch()[0] for _ in range(30)])
    assert (rows[:, 0] == BOS_ID).float().mean() > 0.8


@pytest.mark.parametrize("kwargs", [{}, {"packing": True}, {"sampler": "coprime"}])
def test_resume_continues_identically(stream, kwargs):
    pattern, _ = stream
    a = TokenLoader(pattern, 3, 11, prefetch=4, **kwargs)
    _take(a, 7)
    state = a.state_dict()  # the prefetcher has read further ahead; the state must not include that
    expected = _take(a, 9)
    a.close()
    b = TokenLoader(pattern, 3, 11, **kwargs)
    b.load_state_dict(state)
    got = _take(b, 9)
    b.close()
    for (x0, y0), (x1, y1) in zip(expected, got):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert b.state_dict()["steps"] == 16


def test_resume_rejects_other_data(stream, tmp_path):
    pattern, _ = stream
    state = TokenLoader(pattern, 2, 8).state_dict()
    write_shard(tmp_path / "other.bin", np.arange(500))
    with pytest.raises(ValueError, match="shards"):
        TokenLoader(tmp_path / "other.bin", 2, 8).load_state_dict(state)
    with pytest.raises(ValueError, match="sampler"):
        TokenLoader(pattern, 2, 8, sampler="coprime").load_state_dict(state)


def test_loader_errors(stream, tmp_path):
    pattern, _ = stream
    with pytest.raises(ShardError, match="vocab size 1000"):
        TokenLoader(pattern, 2, 8, vocab_size=1000)
    with pytest.raises(ValueError, match="rank 2"):
        TokenLoader(pattern, 2, 8, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError):
        TokenLoader(tmp_path / "none_*.bin", 2, 8)


def test_validation_tokens(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(100) % 50)
    write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(37) % 50)
    pattern = tmp_path / "fineweb_val_*.bin"
    full = load_validation_tokens(pattern, vocab_size=50)
    assert full.dtype == np.uint16 and len(full) == 137
    assert np.array_equal(full, np.r_[np.arange(100) % 50, np.arange(37) % 50])
    trimmed = load_validation_tokens(pattern, 50, seq_len=16)
    assert len(trimmed) == 8 * 16 + 1 and np.array_equal(trimmed, full[:129])
    with pytest.raises(ShardError):
        load_validation_tokens(pattern, vocab_size=40)
