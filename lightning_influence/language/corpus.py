"""The language-model corpus: documents, a character tokenizer, chunks and queries.

Index letters: N training chunks, D documents, T tokens per chunk.

Documents come from Python's own documentation (offline in every CPython), text files, or a
Hugging Face ``datasets`` corpus; a document longer than the context is split into consecutive
chunks, each one training example; a query is a prompt and a completion whose measurement is
the completion's negative log-likelihood (prompt tokens and padding carry ``labels = -100``).
Nothing here computes influence: :mod:`lightning_influence.language.documents` does.
"""

from __future__ import annotations

import glob
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "Document",
    "Query",
    "CharTokenizer",
    "ChunkedCorpus",
    "QueryDataset",
    "python_docs",
    "read_text_files",
    "hf_documents",
    "chunk_documents",
    "queries_from_config",
    "DEFAULT_STDLIB_MODULES",
    "IGNORE_INDEX",
    "HFTokenizer",
    "as_tokenizer",
    "documents_from_rows",
]


log = logging.getLogger(__name__)

IGNORE_INDEX = -100

#: Standard-library modules whose docstrings join the default corpus (each a document). Chosen
#: for long docstrings and imports without side effects.
DEFAULT_STDLIB_MODULES = (
    "argparse", "ast", "cmd", "configparser", "copy", "csv", "difflib", "doctest", "fileinput",
    "gc", "hashlib", "heapq", "inspect", "io", "itertools", "json", "os", "random", "re", "sched",
    "shelve", "socket", "statistics", "struct", "subprocess", "sys", "tempfile", "time", "timeit",
    "typing", "unittest", "uuid",
)


# ----------------------------------------------------------------------------------- documents
@dataclass(frozen=True)
class Document:
    """A training document: a title (for people) and its text."""

    title: str
    text: str


def python_docs(topics: bool = True, modules: Sequence[str] = DEFAULT_STDLIB_MODULES,
                ) -> list[Document]:
    """Python's own documentation, available offline in every CPython.

    Args:
        topics: include the help topics of ``pydoc_data.topics`` (79 documents, ~465k characters
            in CPython 3.11), titled ``"topic <name>"``.
        modules: standard-library modules whose docstring is a document, titled
            ``"module <name>"`` (a module that does not import or has no docstring is skipped).
    """
    import importlib

    docs = []
    if topics:
        from pydoc_data.topics import topics as help_topics

        docs += [Document(f"topic {name}", text) for name, text in sorted(help_topics.items())]
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - depends on the Python build
            log.warning("skipping module %r: it does not import", name)
            continue
        if module.__doc__ and module.__doc__.strip():
            docs.append(Document(f"module {name}", module.__doc__.strip() + "\n"))
    return docs


def read_text_files(paths: Sequence[str | Path], suffixes: Sequence[str] = (".txt", ".md", ".rst"),
                    ) -> list[Document]:
    """Each text file is one document, titled by its path (a byte of the name that is not
    UTF-8 shown as ``\\xNN``).

    Args:
        paths: files, directories (searched recursively for ``suffixes``) or glob patterns.
        suffixes: file endings taken from directories.

    Raises:
        FileNotFoundError: a path or pattern matches no file.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    files: list[Path] = []
    for spec in paths:
        spec = str(Path(spec).expanduser())
        p = Path(spec)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
        if not found:
            raise FileNotFoundError(f"data.files: {spec!r} matches no file (give files, "
                                    f"directories holding {list(suffixes)} files, or glob patterns).")
        files += found
    docs = [Document(_shown(f), f.read_text(encoding="utf-8", errors="replace")) for f in files]
    return [d for d in docs if d.text.strip()]


def _shown(path: Path) -> str:
    """A path as text that any file or table takes: bytes of the name that are not UTF-8
    are shown as ``\\xNN`` (``caf\\xe9.txt``) instead of lone surrogates."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def hf_documents(name: str, split: str = "train", text_field: str = "text",
                 title_field: str | None = None, config: str | None = None,
                 max_documents: int | None = None) -> list[Document]:
    """Documents from a Hugging Face ``datasets`` corpus (imported only here).

    Args:
        name: the dataset name or a local path (``datasets.load_dataset``'s first argument).
        split: the split to read.
        text_field: the column holding the text.
        title_field: the column holding a title (default: ``"<name>[<row>]"``).
        config: the dataset configuration name.
        max_documents: read at most this many rows.

    Raises:
        ImportError: ``datasets`` is not installed (with the command that installs it).
        KeyError: ``text_field`` or ``title_field`` is not a column.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "data.hf_dataset needs the Hugging Face `datasets` package, which is not installed: "
            "`pip install datasets` (or use data.files=[...] for local text files)."
        ) from err
    split_spec = split if max_documents is None else f"{split}[:{int(max_documents)}]"
    rows = datasets.load_dataset(name, config, split=split_spec)
    columns = list(rows.column_names)
    for column in (text_field, title_field):
        if column is not None and column not in columns:
            raise KeyError(f"The dataset {name!r} has no column {column!r}; columns: {columns}.")
    docs = []
    for i, row in enumerate(rows):
        title = str(row[title_field]) if title_field else f"{name}[{i}]"
        if row[text_field] and str(row[text_field]).strip():
            docs.append(Document(title, str(row[text_field])))
    return docs


def documents_from_rows(rows: Iterable[Mapping[str, Any]], text_field: str = "text",
                        title_field: str | None = None, name: str = "row") -> list[Document]:
    """Documents from rows of a table as they are: a Hugging Face ``datasets.Dataset``, a list
    of dicts, any iterable of mappings. Empty texts are skipped; titles default to
    ``"<name>[<row>]"``.

    Raises:
        KeyError: a row without ``text_field`` (or ``title_field``), naming the row's keys.
    """
    docs = []
    for i, row in enumerate(rows):
        for field_name in (text_field, title_field):
            if field_name is not None and field_name not in row:
                raise KeyError(f"Row {i} has no field {field_name!r}; its fields: "
                               f"{sorted(row)}. Pass text_field=... (and title_field=...).")
        text = row[text_field]
        if text and str(text).strip():
            title = str(row[title_field]) if title_field else f"{name}[{i}]"
            docs.append(Document(title, str(text)))
    return docs


class HFTokenizer:
    """A Hugging Face tokenizer seen through the interface the corpus and reports use
    (``encode``, ``pad_id``, ``token_strings``, ``decode``).

    Special tokens are not added (a chunk is a piece of running text). The pad id is the
    tokenizer's ``pad_token_id``, else its ``eos_token_id`` (the usual choice for causal LMs
    that have no pad token), else 0; padding never counts anyway (``attention_mask``).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self._pad = int(pad) if pad is not None else 0

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text, so that they join back into the decoded string: the text a
        token completes. A byte-level token that holds only part of a character gets ``""``
        and the character goes to the token that completes it (decoded alone, the part would
        be a replacement mark)."""
        ids = [int(i) for i in ids]
        out, done, start = [], "", 0
        for k in range(len(ids)):
            text = self.tokenizer.decode(ids[start:k + 1])
            if text.endswith("\ufffd") and k + 1 < len(ids):
                out.append("")  # an incomplete character: wait for the next token
                continue
            out.append(text[len(done):])
            done = text
            if k - start > 64:  # keep each decode short: restart after a complete token
                start, done = k + 1, ""
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def as_tokenizer(tokenizer: Any) -> Any:
    """The library's :class:`CharTokenizer` (or anything with ``encode``, ``pad_id`` and
    ``token_strings``) as it is; a Hugging Face tokenizer wrapped in :class:`HFTokenizer`."""
    if all(hasattr(tokenizer, a) for a in ("encode", "pad_id", "token_strings")):
        return tokenizer
    if hasattr(tokenizer, "convert_ids_to_tokens") and hasattr(tokenizer, "encode"):
        return HFTokenizer(tokenizer)
    raise TypeError(
        f"A {type(tokenizer).__name__} is not a tokenizer this library can use: it needs "
        "encode(text) -> ids, pad_id and token_strings(ids), or to be a Hugging Face "
        "tokenizer (with convert_ids_to_tokens)."
    )


# ----------------------------------------------------------------------------------- tokens
class CharTokenizer:
    """Characters as tokens: id 0 pads, id 1 stands for characters outside the vocabulary.

    Args:
        alphabet: the characters of the vocabulary (ids 2, 3, ... in this order).
    """

    PAD, UNK = 0, 1

    def __init__(self, alphabet: str) -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("CharTokenizer: the alphabet repeats characters.")
        self.alphabet = alphabet
        self._ids = {c: i + 2 for i, c in enumerate(alphabet)}

    @classmethod
    def from_texts(cls, texts: Sequence[str], min_count: int = 1) -> CharTokenizer:
        """The characters seen at least ``min_count`` times, in code-point order."""
        counts = Counter()
        for text in texts:
            counts.update(text)
        return cls("".join(sorted(c for c, n in counts.items() if n >= min_count)))

    @property
    def pad_id(self) -> int:
        return self.PAD

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 2

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, self.UNK) for c in text]

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """One string per id: its character, ``""`` for padding, ``"\\ufffd"`` for unknown."""
        out = []
        for i in ids:
            i = int(i)
            out.append("" if i == self.PAD else "\ufffd" if i == self.UNK
                       else self.alphabet[i - 2])
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.token_strings(ids))

    def state_dict(self) -> dict[str, str]:
        return {"alphabet": self.alphabet}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, str]) -> CharTokenizer:
        return cls(state["alphabet"])


@dataclass
class ChunkedCorpus(Dataset):
    """Documents cut into chunks of at most ``context`` tokens: one training example per chunk.

    Items are dicts ``{"input_ids": [T] long, "attention_mask": [T] bool}`` (right-padded with
    the tokenizer's pad id), which :class:`~lightning_influence.CausalLMTask` understands.

    Attributes:
        documents: the documents, in order.
        tokenizer: the tokenizer.
        context: T.
        input_ids: ``[N, T]`` token ids.
        attention_mask: ``[N, T]`` True on real tokens.
        chunk_document: ``[N]`` the document of each chunk.
        chunk_offset: ``[N]`` the position of each chunk's first token in its document.
    """

    documents: list[Document]
    tokenizer: Any  # CharTokenizer, HFTokenizer: encode, pad_id, token_strings
    context: int
    input_ids: Tensor
    attention_mask: Tensor
    chunk_document: Tensor
    chunk_offset: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}

    @property
    def num_documents(self) -> int:
        return len(self.documents)

    @property
    def titles(self) -> list[str]:
        return [d.title for d in self.documents]

    def document_chunks(self, document: int) -> Tensor:
        """Indices ``[n]`` of one document's chunks, in reading order."""
        return (self.chunk_document == document).nonzero().flatten()

    def chunks_of(self, documents: Sequence[int] | Tensor) -> Tensor:
        """Sorted indices of every chunk of the given documents."""
        docs = torch.as_tensor(list(documents) if not isinstance(documents, Tensor) else documents)
        return torch.isin(self.chunk_document, docs).nonzero().flatten()


def chunk_documents(documents: Sequence[Document] | Iterable[Mapping[str, Any]],
                    tokenizer: Any, context: int) -> ChunkedCorpus:
    """Tokenize and split every document into consecutive chunks of ``context`` tokens.

    ``documents`` are :class:`Document` objects or rows with a ``"text"`` field as they are (a
    Hugging Face ``datasets.Dataset``; see :func:`documents_from_rows` for other fields);
    ``tokenizer`` is a :class:`CharTokenizer` or a Hugging Face tokenizer. The last chunk of a
    document is padded; chunks of a single token (nothing to predict) are dropped; a document
    left with no chunk is dropped too.
    """
    tokenizer = as_tokenizer(tokenizer)
    documents = list(documents)
    if documents and not isinstance(documents[0], Document):
        documents = documents_from_rows(documents)
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}.")
    kept_docs: list[Document] = []
    rows, masks, doc_ids, offsets = [], [], [], []
    for doc in documents:
        ids = tokenizer.encode(doc.text)
        starts = [s for s in range(0, len(ids), context) if len(ids) - s >= 2]
        if not starts:
            continue
        d = len(kept_docs)
        kept_docs.append(doc)
        for s in starts:
            piece = ids[s:s + context]
            rows.append(piece + [tokenizer.pad_id] * (context - len(piece)))
            masks.append([True] * len(piece) + [False] * (context - len(piece)))
            doc_ids.append(d)
            offsets.append(s)
    if not rows:
        raise ValueError("No document has two tokens or more: nothing to train on.")
    return ChunkedCorpus(kept_docs, tokenizer, context, torch.tensor(rows, dtype=torch.long),
                         torch.tensor(masks, dtype=torch.bool), torch.tensor(doc_ids),
                         torch.tensor(offsets))


# ----------------------------------------------------------------------------------- queries
@dataclass(frozen=True)
class Query:
    """A prompt and the completion whose log-likelihood is measured."""

    prompt: str
    completion: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def queries_from_config(items: Sequence[Any]) -> list[Query]:
    """Queries from config items: mappings with ``prompt`` and ``completion`` (or Query objects)."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Query):
            out.append(item)
            continue
        if not isinstance(item, Mapping) or "prompt" not in item or "completion" not in item:
            raise ValueError(f"Query {i} is {item!r}; each query needs 'prompt' and 'completion'.")
        if not str(item["completion"]):
            raise ValueError(f"Query {i} has an empty completion: nothing to measure.")
        out.append(Query(str(item["prompt"]), str(item["completion"])))
    if not out:
        raise ValueError("No queries: give at least one {prompt, completion} pair.")
    return out


class QueryDataset(Dataset):
    """Queries as dict items ``input_ids``, ``attention_mask`` and ``labels`` (right-padded).

    ``labels`` equal the input ids on completion tokens and ``-100`` on prompt tokens and padding,
    so :class:`~lightning_influence.CausalLMTask`'s measurement is the completion's negative
    log-likelihood: the first completion token is predicted from the prompt's last token.

    Args:
        queries: the queries.
        tokenizer: the tokenizer.
        max_length: the model's context; a longer query is refused.
    """

    def __init__(self, queries: Sequence[Query], tokenizer: Any,
                 max_length: int | None = None) -> None:
        self.queries = list(queries)
        tokenizer = as_tokenizer(tokenizer)
        encoded = [(tokenizer.encode(q.prompt), tokenizer.encode(q.completion)) for q in self.queries]
        width = max(len(p) + len(c) for p, c in encoded)
        if max_length is not None and width > max_length:
            raise ValueError(f"A query has {width} tokens, more than the model's context of "
                             f"{max_length}; shorten it.")
        n = len(encoded)
        self.input_ids = torch.full((n, width), tokenizer.pad_id, dtype=torch.long)
        self.attention_mask = torch.zeros(n, width, dtype=torch.bool)
        self.labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        for q, (p, c) in enumerate(encoded):
            ids = torch.tensor(p + c, dtype=torch.long)
            self.input_ids[q, :ids.numel()] = ids
            self.attention_mask[q, :ids.numel()] = True
            self.labels[q, len(p):ids.numel()] = ids[len(p):]

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "labels": self.labels[index]}
