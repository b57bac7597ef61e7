"""Corpora: deterministic splits, fixed-length sequences with BOS at position 0 and no padding."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from cltlab.corpus import documents, token_sequences
from cltlab.models import gpt2_tokenizer

BOS = 50256


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture
def numbered_corpus(tmp_path):
    """A text file of 25 documents ``document 0`` … ``document 24`` separated by blank lines."""
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(f"document {i} has a few words in it" for i in range(25)) + "\n\n\n")
    return path


def test_every_tenth_document_is_eval(numbered_corpus):
    train = list(documents(str(numbered_corpus), "train"))
    evals = list(documents(str(numbered_corpus), "eval"))
    assert [d.split()[1] for d in evals] == ["9", "19"]
    assert [int(d.split()[1]) for d in train] == [i for i in range(25) if i % 10 != 9]


def test_folder_corpus_reads_every_txt_file_in_order(tmp_path):
    for i in range(12):
        (tmp_path / f"{i:02d}.txt").write_text(f"file {i}")
    (tmp_path / "skip.md").write_text("not a corpus file")
    assert list(documents(str(tmp_path), "eval")) == ["file 9"]
    assert len(list(documents(str(tmp_path), "train"))) == 11


def test_empty_folder_and_unknown_corpus_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no .txt files"):
        list(documents(str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"Corpus 'no-such-corpus' is neither a registry name"):
        list(documents("no-such-corpus"))
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'eval'\), not 'test'"):
        list(documents("shakespeare", "test"))


def test_shakespeare_splits_are_disjoint():
    train = list(documents("shakespeare", "train"))
    evals = list(documents("shakespeare", "eval"))
    assert len(train) > 0 and len(evals) > 0
    assert not set(train) & set(evals)


def test_sequences_are_cut_from_one_bos_joined_stream(numbered_corpus, tokenizer):
    seq_len, batch_size = 9, 3
    batches = list(
        token_sequences(
            str(numbered_corpus), tokenizer, seq_len=seq_len, bos_token_id=BOS, batch_size=batch_size
        )
    )
    assert batches and all(b.shape == (batch_size, seq_len) and b.dtype == torch.long for b in batches)
    sequences = torch.cat(batches)
    assert (sequences[:, 0] == BOS).all()
    # The bodies, concatenated, are a prefix of the train documents joined (and ended) by BOS.
    stream = []
    for doc in documents(str(numbered_corpus), "train"):
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [BOS]
    body = sequences[:, 1:].reshape(-1).tolist()
    assert body == stream[: len(body)]
    # Only the last partial batch (and the incomplete last sequence) are dropped.
    n_full_sequences = len(stream) // (seq_len - 1)
    assert len(sequences) == n_full_sequences // batch_size * batch_size


def test_shakespeare_train_and_eval_sequences(tokenizer):
    train = next(token_sequences("shakespeare", tokenizer, seq_len=16, bos_token_id=BOS, batch_size=2))
    evals = next(
        token_sequences("shakespeare", tokenizer, seq_len=16, bos_token_id=BOS, split="eval", batch_size=2)
    )
    assert train.shape == evals.shape == (2, 16)
    assert (train[:, 0] == BOS).all() and (evals[:, 0] == BOS).all()
    assert not torch.equal(train, evals)
    # Deterministic: the same call gives the same first batches.
    again = token_sequences("shakespeare", tokenizer, seq_len=16, bos_token_id=BOS, batch_size=2)
    first = list(itertools.islice(again, 1))[0]
    assert torch.equal(first, train)


def test_an_hf_corpus_streams_a_local_dataset_folder_through_datasets(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"Document {i}: the quick brown fox jumps over the lazy dog." for i in range(40)]
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "part-0.jsonl").write_text(
        "".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(texts))
    )
    (tmp_path / "parquet").mkdir()
    pq.write_table(
        pa.table({"id": list(range(40)), "content": texts}), tmp_path / "parquet" / "train-0.parquet"
    )
    for folder in ("jsonl", "parquet"):  # a 'text' column; the one string column
        corpus = f"hf:{tmp_path / folder}"
        assert list(documents(corpus, "train")) == [t for i, t in enumerate(texts) if i % 10 != 9]
        assert list(documents(corpus, "eval")) == texts[9::10]
    batch = next(token_sequences(f"hf:{tmp_path / 'jsonl'}", tokenizer, seq_len=8, bos_token_id=BOS))
    assert batch.shape == (1, 8) and batch[0, 0] == BOS
    first = tokenizer(texts[0], add_special_tokens=False)["input_ids"][:7]
    assert batch[0, 1:].tolist() == first


def test_an_hf_corpus_without_a_text_column_is_one_clear_error(tmp_path):
    (tmp_path / "part-0.jsonl").write_text(json.dumps({"title": "a", "body": "b"}) + "\n")
    with pytest.raises(
        ValueError, match=r"no 'text' column and not exactly one string column .*\['body', 'title'\]"
    ):
        next(documents(f"hf:{tmp_path}"))
