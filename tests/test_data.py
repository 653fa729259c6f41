"""Data pipeline: sources, held-out split, packing with segment ids, exact iterator state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import train_fixtures as fx

from minimax_jax.training import data


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return fx.make_corpus(str(tmp_path_factory.mktemp("corpus")), n_docs=4)


def _docs_and_tok(corpus):
    docs = data.open_documents([data.SourceSpec("text", corpus[0])])
    return docs, data.load_tokenizer(corpus[1])


def test_sources_text_jsonl_arrayrecord(tmp_path):
    texts = ["first doc", "second one", "ünïcode third"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    with open(tmp_path / "d.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    for t in texts:
        writer.write(t.encode())
    writer.close()
    specs = [
        data.SourceSpec("text", str(tmp_path / "*.txt")),
        data.SourceSpec("jsonl", str(tmp_path / "d.jsonl")),
        data.SourceSpec("arrayrecord", str(tmp_path / "d.array_record")),
    ]
    docs = data.open_documents(specs)
    assert [docs[i] for i in range(len(docs))] == texts * 3


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(data.DataError, match="matches no files"):
        data.open_documents([data.SourceSpec("text", str(tmp_path / "none" / "*.txt"))])
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(data.DataError, match="empty"):
        data.open_documents([data.SourceSpec("jsonl", str(tmp_path / "e.jsonl"))])
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(data.DataError, match="bad.jsonl:1"):
        data.open_documents([data.SourceSpec("jsonl", str(tmp_path / "bad.jsonl"))])


def test_split_is_seeded_and_disjoint():
    train, held = data.split_documents(100, 0.1, seed=3)
    assert len(held) == 10 and not set(train) & set(held)
    assert sorted([*train, *held]) == list(range(100))
    np.testing.assert_array_equal(data.split_documents(100, 0.1, seed=3)[1], held)
    assert not np.array_equal(data.split_documents(100, 0.1, seed=4)[1], held)


def test_packing_keeps_every_document_in_order(corpus):
    docs, tok = _docs_and_tok(corpus)
    idx = np.arange(len(docs))
    batches = data.eval_batches(docs, idx, tok, 0, seq_len=8, batch_size=2, max_batches=100)
    pieces, tokens = [], []
    for b in batches:
        for row, seg in zip(b["tokens"], b["segment_ids"], strict=True):
            assert np.all(np.diff(seg[seg > 0]) >= 0) and seg[0] in (0, 1)
            for s in range(1, seg.max() + 1):
                pieces.append(row[seg == s])
            tokens.extend(row[seg > 0])
    want = np.concatenate([[*tok.encode(docs[i]).ids, 0] for i in idx])
    np.testing.assert_array_equal(np.asarray(tokens), want)  # concat-then-split, eos after each
    assert batches[-1]["segment_ids"][-1].max() == 0 or len(want) % 16 == 0  # padded tail


def test_iterator_state_restores_exactly_and_shuffles_per_epoch(corpus):
    docs, tok = _docs_and_tok(corpus)
    idx = np.arange(len(docs))

    def make():
        return data.train_dataset(docs, idx, tok, 0, seq_len=16, batch_size=4, seed=7)

    it = make()
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(data.iterator_state(it)))
    want = [next(it) for _ in range(3)]
    other = make()
    other.set_state(state)
    for w in want:
        got = next(other)
        assert all(np.array_equal(w[k], got[k]) for k in w)
    order = [it.docs[i] for i in range(4 * len(docs))]  # 4 epochs of document texts
    epochs = [sorted(order[e * len(docs) : (e + 1) * len(docs)]) for e in range(4)]
    assert all(e == epochs[0] for e in epochs)  # every epoch is a permutation of all documents
    assert len({tuple(order[e * 4 : e * 4 + 4]) for e in range(4)}) > 1  # reshuffled per epoch


def test_process_shards_are_disjoint(corpus):
    docs, tok = _docs_and_tok(corpus)
    idx = np.arange(len(docs))
    seen = []
    for p in range(2):
        ds = data.train_dataset(docs, idx, tok, 0, seq_len=64, batch_size=2, seed=0,
                                process_index=p, process_count=2)  # fmt: skip
        first = next(ds)
        assert first["tokens"].shape == (1, 64)
        seen.append({int(t) for t in first["tokens"][0][:5]})
    assert not seen[0] & seen[1]  # different documents start each process's stream


class _Failing:
    """Two batches, then a DataError (a bad document met by the producer thread)."""

    def __init__(self):
        self.n = 0

    def __next__(self):
        self.n += 1
        if self.n > 2:
            raise data.DataError("bad document 3")
        return {"tokens": np.full((1, 4), self.n)}

    def get_state(self):
        return {"index": self.n, "offset": 0}


def test_prefetch_gives_the_same_batches_and_the_consumed_state(corpus):
    """The background producer changes nothing a run sees: the same batches in order, the state
    after the batches returned (not the producer's, which runs ahead), exact restore mid-stream,
    and the producer's errors raised by the next() that reaches them."""
    docs, tok = _docs_and_tok(corpus)
    idx = np.arange(len(docs))

    def make():
        return data.train_dataset(docs, idx, tok, 0, seq_len=16, batch_size=4, seed=7)

    plain, ahead = make(), data.Prefetch(make(), depth=3)
    for _ in range(6):
        want, got = next(plain), next(ahead)
        assert all(np.array_equal(want[k], got[k]) for k in want)
        assert ahead.get_state() == plain.get_state()
    state = ahead.get_state()
    assert ahead.it.get_state() != state  # the producer is ahead of what was consumed
    want = [next(plain) for _ in range(3)]
    resumed = data.Prefetch(make(), depth=2)
    resumed.set_state(state)
    for w in want:
        got = next(resumed)
        assert all(np.array_equal(w[k], got[k]) for k in w)
    ahead.set_state(state)  # also on a running producer
    assert np.array_equal(next(ahead)["tokens"], want[0]["tokens"])
    for p in (ahead, resumed):
        p.close()

    failing = data.Prefetch(_Failing(), depth=4)
    assert [int(next(failing)["tokens"][0, 0]) for _ in range(2)] == [1, 2]
    with pytest.raises(data.DataError, match="bad document 3"):
        next(failing)
    assert failing.get_state() == {"index": 2, "offset": 0}


def test_prefetch_ends_with_the_inner_iterator(corpus):
    docs, tok = _docs_and_tok(corpus)
    idx = np.arange(len(docs))
    finite = data.PackedBatches(
        data.grain.MapDataset.source(data._Subset(docs, idx)), data._Tokenize(tok, 0), 8, 2
    )
    n = sum(1 for _ in data.PackedBatches(
        data.grain.MapDataset.source(data._Subset(docs, idx)), data._Tokenize(tok, 0), 8, 2
    ))  # fmt: skip
    assert n >= 2 and len(list(data.Prefetch(finite, depth=2))) == n
