import numpy as np
import pytest

from pipelines import metrics
from pipelines.metrics import classification_metrics, holdout, macro_f1, top1
from tests.pipelines.tiny import as_shards


def test_macro_f1_known_answer():
    labels, preds = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    assert macro_f1(preds, labels) == pytest.approx(100 * (2 / 3 + 4 / 5) / 2)
    metrics = classification_metrics(np.log(np.array([[0.5, 0.5], [0.25, 0.75]])), np.array([0, 1]))
    assert metrics["loss"] == pytest.approx(-(np.log(0.5) + np.log(0.75)) / 2)


def test_top1_counts_any_of_a_samples_classes():
    logits = np.array([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0]])
    assert top1(logits, np.array([1, 1])) == 50.0
    assert top1(logits, np.array([[2, 1], [1, -1]])) == 50.0  # multi-label, padded with -1


def test_holdout_is_a_seeded_disjoint_split_of_at_least_one():
    kept, held = holdout(50, 0.1, seed=0, salt=7)
    assert len(held) == 5 and sorted([*kept, *held]) == list(range(50))
    assert np.array_equal(holdout(50, 0.1, seed=0, salt=7)[1], held)
    assert not np.array_equal(holdout(50, 0.1, seed=1, salt=7)[1], held)
    assert len(holdout(5, 0.01, seed=0, salt=7)[1]) == 1


def read_once(spans: list[tuple[str, int, int]], split) -> bool:
    """Whether byte `spans` (path, offset, size) read the split's samples' bytes, each once and nothing else."""
    wanted = sorted((split.index.shard_url(int(s)), int(split.index.offset[p]), int(split.index.size[p]))
                    for s, p in zip(split.index.shard_of(split.positions), split.positions, strict=True))
    pieces = []  # the reads cut at sample boundaries
    for path, offset, size in sorted(spans):
        inside = [w for w in wanted if w[0] == path and offset <= w[1] and w[1] + w[2] <= offset + size]
        if sum(w[2] for w in inside) != size:
            return False
        pieces += inside
    return sorted(pieces) == wanted


def _counting_reads(monkeypatch) -> tuple[list, list]:
    """(shard URLs streamed, (path, offset, size) read by offset) from here on."""
    from pipelines.data import reader

    streamed, by_offset = [], []
    open_url, read = reader.open_url, reader.ShardFiles.read
    monkeypatch.setattr(reader, "open_url", lambda url: streamed.append(url) or open_url(url))
    monkeypatch.setattr(reader.ShardFiles, "read", lambda self, path, offset, size:
                        by_offset.append((path, offset, size)) or read(self, path, offset, size))
    return streamed, by_offset


@pytest.mark.parametrize("streamed", [False, True], ids=["by-offset", "pipe"])
def test_two_ranks_read_disjoint_parts_and_stop_when_they_have_them(monkeypatch, streamed):
    from pipelines import distributed
    from pipelines.data import eval_batches
    from pipelines.data.index import ShardSubset, scratch_index

    split = as_shards(np.zeros((40, 8, 8, 3), np.uint8), np.arange(40) % 4, per_shard=10)
    if streamed:
        index = scratch_index([f"pipe:cat {url}" for url in split.index.shards])
        split = ShardSubset(index, np.arange(len(index), dtype=np.int64))
    opened, by_offset = _counting_reads(monkeypatch)
    read, per_rank = [], []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "ranks", lambda rank=rank: distributed.Ranks(rank, 2))
        read.append([k for batch in eval_batches(metrics.rank_part(split), 8) for k in batch.keys])
        per_rank.append(opened[:])
        opened.clear()
    assert read[0] + read[1] == [f"{i:06d}" for i in range(40)]  # disjoint, covering, in the split's order
    if streamed:  # whole shards per rank, each opened once, by the rank that owns it
        assert per_rank == [split.index.shards[:2], split.index.shards[2:]]
    else:
        assert read_once(by_offset, split) and len(by_offset) < 40  # adjacent samples in one read
    opened.clear()
    monkeypatch.setattr(distributed, "ranks", distributed.Ranks)
    from pipelines.data import reader

    samples, read_shard = [], reader.read_shard
    monkeypatch.setattr(reader, "read_shard", lambda url: (samples.append(s) or s for s in read_shard(url)))
    first = list(eval_batches(split.part(np.array([1, 3])), 8))
    assert first[0].keys == ["000001", "000003"] and len(opened) == (1 if streamed else 0)
    assert len(samples) == (4 if streamed else 0)  # the stream stops at the last wanted sample, not the shard's end
