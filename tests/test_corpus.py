"""Corpora: deterministic splits, fixed-length sequences with BOS at position 0 and no padding."""

from __future__ import annotations

import itertools

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
