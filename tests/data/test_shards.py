"""Shard format: byte-exact round trip and a named ShardError for each kind of bad file."""
import numpy as np
import pytest

from pgolf.data.shards import (HEADER_BYTES, MAGIC, ShardError, ShardWriter, list_shards, read_shard,
                               shard_token_count, write_shard)


def _tokens(n=1237, vocab=1024, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(np.uint16)


def test_round_trip_and_exact_bytes(tmp_path):
    toks = _tokens()
    path = tmp_path / "fineweb_train_000000.bin"
    assert write_shard(path, toks.astype(np.int64)) == toks.size
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * toks.size
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[0] == MAGIC and header[1] == 1 and header[2] == toks.size and not header[3:].any()
    assert np.array_equal(np.frombuffer(raw[HEADER_BYTES:], dtype="<u2"), toks)
    got = read_shard(path, vocab_size=1024)
    assert isinstance(got, np.memmap) and got.dtype == np.uint16
    assert np.array_equal(got, toks)
    assert shard_token_count(path) == toks.size


def test_streaming_writer_matches_write_shard(tmp_path):
    toks = _tokens(5000)
    w = ShardWriter(tmp_path / "a.bin")
    for piece in np.array_split(toks, 7):
        w.write(piece)
    assert not (tmp_path / "a.bin").exists()  # only the temporary name until close
    assert w.close() == toks.size
    write_shard(tmp_path / "b.bin", toks)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "e.bin", [])
    assert read_shard(tmp_path / "e.bin", vocab_size=2).size == 0


def test_write_rejects_out_of_range(tmp_path):
    with pytest.raises(ShardError, match="65535"):
        write_shard(tmp_path / "x.bin", [1, 70000])


def _bad(tmp_path, mutate):
    path = tmp_path / "fineweb_val_000007.bin"
    write_shard(path, _tokens(300, vocab=1000))
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(mutate(raw)))
    return path


def _set_word(raw, i, value):
    raw[4 * i:4 * i + 4] = np.array([value], dtype="<i4").tobytes()
    return raw


@pytest.mark.parametrize("kind, mutate, needle", [
    ("magic", lambda r: _set_word(r, 0, 12345), "wrong magic 12345"),
    ("version", lambda r: _set_word(r, 1, 2), "unsupported version 2"),
    ("size", lambda r: r + b"\x00\x00", "size mismatch"),
    ("size", lambda r: _set_word(r, 2, 299), "size mismatch"),
    ("truncated", lambda r: r[:-3], "truncated"),
    ("truncated", lambda r: r[:100], "truncated"),
])
def test_bad_shards_name_the_file(tmp_path, kind, mutate, needle):
    path = _bad(tmp_path, mutate)
    for reader in (read_shard, shard_token_count):
        with pytest.raises(ShardError) as info:
            reader(path)
        assert str(path) in str(info.value) and needle in str(info.value)
        assert info.value.kind == kind


def test_id_beyond_vocab(tmp_path):
    toks = _tokens(3000, vocab=1000)
    toks[2345] = 1000
    path = tmp_path / "fineweb_train_000003.bin"
    write_shard(path, toks)
    read_shard(path)  # no vocabulary given: no check
    with pytest.raises(ShardError) as info:
        read_shard(path, vocab_size=1000)
    msg = str(info.value)
    assert str(path) in msg and "token id 1000 at position 2345" in msg and info.value.kind == "vocab"


def test_id_check_is_chunked(tmp_path, monkeypatch):
    import pgolf.data.shards as shards
    monkeypatch.setattr(shards, "_CHECK_CHUNK", 64)
    toks = _tokens(1000, vocab=50)
    toks[777] = 60
    write_shard(tmp_path / "c.bin", toks)
    with pytest.raises(ShardError, match="position 777"):
        read_shard(tmp_path / "c.bin", vocab_size=50)


def test_missing_file(tmp_path):
    with pytest.raises(ShardError, match="no such file"):
        read_shard(tmp_path / "nope.bin")


def test_list_shards(tmp_path):
    for i in (2, 0, 1):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", [1, 2])
    assert [p.name for p in list_shards(tmp_path / "fineweb_train_*.bin")] == [
        f"fineweb_train_{i:06d}.bin" for i in range(3)]
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        list_shards(tmp_path / "fineweb_val_*.bin")
