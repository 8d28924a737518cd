"""The startup suite's measurement: a fresh `pgolf train` process on synthetic shards (tiny model on CPU here)."""
import numpy as np
import pytest

from pgolf import BOS_ID
from pgolf.bench.harness import random_documents
from pgolf.bench.startup import launch_to_first_step

TINY = ["--vocab-size", "1024", "--num-layers", "2", "--model-dim", "32", "--num-heads", "2", "--num-kv-heads", "1",
        "--seq-len", "32", "--loop-count", "1", "--parallel-from-layer", "-1", "--train-batch-tokens", "256",
        "--grad-accum-steps", "1", "--warmup-steps", "1", "--max-wallclock-seconds", "0"]


def test_random_documents_have_bos_starts_and_stay_in_vocab():
    tokens = random_documents(50_000, 1024, median_doc=300, seed=3)
    assert tokens[0] == BOS_ID and tokens.min() >= 1 and tokens.max() < 1024
    starts = np.flatnonzero(tokens == BOS_ID)
    assert 50 < len(starts) < 500  # about 50,000 / (300 * e^0.5) documents
    assert np.array_equal(tokens, random_documents(50_000, 1024, median_doc=300, seed=3))


@pytest.mark.slow
def test_launch_to_first_step_reads_the_trainers_event():
    t = launch_to_first_step(TINY, vocab=1024, train_tokens=20_000, timeout=240)
    assert 0 < t["since_launch_s"] < 240 and t["warmup_s"] >= 0


def test_a_failing_run_says_why():
    with pytest.raises(RuntimeError, match="failed"):
        launch_to_first_step([*TINY, "--num-heads", "3"], vocab=1024, train_tokens=5_000, timeout=240)
