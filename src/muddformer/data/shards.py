"""Data: the bundled corpus, tokenizers, and memory-mapped token shards.

A prepared data folder holds `meta.json`, `tokenizer.json` and token shards
`{split}-{i:05d}.bin` (uint16 when the vocabulary fits, else uint32; documents separated by the
end-of-text token). `prepare` writes the folder atomically and is idempotent: re-running with the
same inputs and options leaves it as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import IO

import numpy as np
from tqdm import tqdm

from muddformer._utils import atomic_dir
from muddformer.data.corpus import BUNDLED, bundled_split, cache_dir
from muddformer.data.documents import (
    count_documents,
    documents,
    files_fingerprint,
    held_out,
    input_files,
    split_document,
)
from muddformer.data.tokenizers import TOKENIZER_NAME, eot_id, load_tokenizer, tokenizer_json, train_tokenizer
from muddformer.errors import DataError

META_NAME = "meta.json"
FORMAT = "mudd-tokens"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000
# A byte-level BPE is trained on the first documents up to this many characters: its merges settle long before
# a large corpus ends, and the trainer holds its word counts in memory.
TOKENIZER_SAMPLE_CHARS = 1_000_000_000
SPLITS = ("train", "val")
ENCODE_BATCH = 256  # documents tokenised at a time (the tokenizer spreads a batch over the CPU's threads)
ENCODE_BATCH_CHARS = 16_000_000  # and at most about this many characters


# ---- the bundled corpus -----------------------------------------------------------------------


def bundled_data_dir(vocab_size: int = 8192) -> Path:
    """The bundled corpus prepared with an 8k (or given) byte-level BPE, cached after the first call."""
    out = cache_dir() / "data" / f"{BUNDLED}-bpe{vocab_size}"
    docs = {"train": bundled_split("train"), "val": bundled_split("val")}
    prepare_documents(docs, out, vocab_size=vocab_size, source=f"bundled:{BUNDLED}")
    return out


# ---- writing prepared data ----------------------------------------------------------------------
def _fingerprint(docs: dict[str, list[str]], options: dict) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for split in sorted(docs):
        for d in docs[split]:
            h.update(split.encode())
            h.update(hashlib.sha256(d.encode()).digest())
    return h.hexdigest()


def prepare_documents(
    docs: dict[str, list[str]],
    out: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    vocab_size: int = 8192,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    source: str = "",
    progress: bool = False,
    tokenizer_sample_chars: int = TOKENIZER_SAMPLE_CHARS,
) -> dict:
    """Tokenise split documents held in memory into `out`; returns its metadata. Skips the work if `out` is up to
    date (the documents' hashes and the options)."""
    tok_text = _tokenizer_text(tokenizer)
    options = {"tokenizer": tok_text, "vocab_size": None if tok_text else vocab_size, "shard_tokens": shard_tokens}
    if not tok_text and sum(map(len, docs["train"])) > tokenizer_sample_chars:  # only a sample that cuts counts
        options["tokenizer_sample_chars"] = tokenizer_sample_chars
    return write_prepared(
        out,
        _fingerprint(docs, options),
        lambda: iter(docs["train"]),
        lambda: _labelled(docs),
        sum(map(len, docs.values())),
        docs,
        tokenizer,
        vocab_size,
        shard_tokens,
        source,
        progress,
        tokenizer_sample_chars,
    )


def _tokenizer_text(tokenizer: str | os.PathLike | None) -> str | None:
    if tokenizer is None:
        return None
    load_tokenizer(tokenizer)  # fail early on a missing or bad file
    return tokenizer_json(tokenizer).read_text()


def up_to_date(out: Path, fingerprint: str) -> dict | None:
    """The metadata of `out` when it was prepared with this fingerprint and its files are whole."""
    meta_path = out / META_NAME
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    tokenizer_kept = (out / meta.get("tokenizer", TOKENIZER_NAME)).is_file()
    if meta.get("fingerprint") == fingerprint and tokenizer_kept and shard_problem(out, meta) is None:
        return meta
    return None  # prepared again, which also repairs missing or truncated files


def tokenizer_sample(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """The first documents, up to `max_chars` characters (at least one): what a BPE is trained on."""
    seen = 0
    for text in texts:
        if seen and seen + len(text) > max_chars:
            return
        seen += len(text)
        yield text


def write_prepared(
    out: str | os.PathLike,
    fingerprint: str,
    train_texts: Callable[[], Iterable[str]],
    labelled_texts: Callable[[], Iterable[tuple[str, str]]],
    n_texts: int,
    split_names: Iterable[str],
    tokenizer: str | os.PathLike | None,
    vocab_size: int,
    shard_tokens: int,
    source: str,
    progress: bool,
    tokenizer_sample_chars: int,
) -> dict:
    """Train or load the tokenizer and write every (split, text) into its split's shards, in one pass over texts
    that are read a batch at a time; `out` is replaced whole at the end (nothing half-written is left)."""
    out = Path(out)
    meta = up_to_date(out, fingerprint)
    if meta is not None:
        return meta
    if tokenizer_sample_chars < 1:
        raise DataError(f"tokenizer_sample_chars must be positive, got {tokenizer_sample_chars}")
    if out.is_dir() and not (out / META_NAME).is_file() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not a prepared data folder; give --out a new or prepared folder")
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    else:
        tok = train_tokenizer(tokenizer_sample(train_texts(), tokenizer_sample_chars), vocab_size)
    eot = eot_id(tok)
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    with atomic_dir(out) as tmp_name:
        tmp = Path(tmp_name)
        writers = {split: ShardWriter(tmp, split, dtype, shard_tokens) for split in split_names}
        bar = tqdm(total=n_texts, desc="tokenising", unit="doc", disable=not progress)
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # the same ids without the offsets
        for batch in batched(labelled_texts(), ENCODE_BATCH, ENCODE_BATCH_CHARS):
            for (split, _), enc in zip(batch, encode([text for _, text in batch])):
                writers[split].add(enc.ids + ([eot] if eot is not None else []))
            bar.update(len(batch))
        bar.close()
        tok.save(str(tmp / TOKENIZER_NAME))
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "vocab_size": vocab,
            "dtype": np.dtype(dtype).name,
            "eot_id": eot,
            "splits": {split: writer.close() for split, writer in writers.items()},
            "tokenizer": TOKENIZER_NAME,
            "source": source,
            "fingerprint": fingerprint,
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def batched(labelled: Iterable[tuple[str, str]], max_texts: int, max_chars: int) -> Iterator[list]:
    """(split, text) pairs in batches of at most `max_texts` texts and about `max_chars` characters (a longer text is
    a batch of its own), so that memory follows the batch, not the documents' sizes."""
    batch: list = []
    chars = 0
    for item in labelled:
        if batch and (len(batch) == max_texts or chars + len(item[1]) > max_chars):
            yield batch
            batch, chars = [], 0
        batch.append(item)
        chars += len(item[1])
    if batch:
        yield batch


class ShardWriter:
    """One split's shard files, appended to a document at a time; a shard is closed once it holds `shard_tokens`
    tokens or more (documents are not cut), so memory stays at one document's ids."""

    def __init__(self, folder: Path, split: str, dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file: IO[bytes] | None = None
        self.pending = self.total = 0

    def add(self, ids: list[int]) -> None:
        if self.file is None:
            self.file = open(self.folder / f"{self.split}-{len(self.shards):05d}.bin", "wb")
        np.asarray(ids, dtype=self.dtype).tofile(self.file)
        self.pending += len(ids)
        self.total += len(ids)
        if self.pending >= self.shard_tokens:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self.file is not None
        self.file.close()
        self.shards.append({"file": Path(self.file.name).name, "tokens": self.pending})
        self.file, self.pending = None, 0

    def close(self) -> dict:
        if self.file is not None:
            self._close_shard()
        return {"shards": self.shards, "tokens": self.total}


def prepare(
    inputs: list[str],
    out: str | os.PathLike,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    field: str = "text",
    val_fraction: float = 0.05,
    val_inputs: list[str] | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = False,
    val_documents: int | None = None,
    tokenizer_sample_chars: int = TOKENIZER_SAMPLE_CHARS,
) -> dict:
    """`mudd prepare`: documents streamed from files, the last ones held out for validation (or `val_inputs`),
    tokenised into shards. Up to date when the files' bytes and the options are those of the last preparation."""
    if val_inputs and val_documents is not None:
        raise DataError("give --val FILES or --val-documents N, not both")
    if not val_inputs and val_documents is None and not 0 < val_fraction < 1:  # one check for both ways to split
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = input_files(inputs)
    val_files = input_files(val_inputs) if val_inputs else []
    refuse_inputs_inside(Path(out), [*inputs, *(val_inputs or [])])
    tok_text = _tokenizer_text(tokenizer)
    options = {
        "field": field,
        "val_fraction": None if val_files or val_documents is not None else val_fraction,
        "val_documents": None if val_files else val_documents,
        "tokenizer": tok_text,
        "vocab_size": None if tok_text else vocab_size,
        "tokenizer_sample_chars": None if tok_text else tokenizer_sample_chars,
        "shard_tokens": shard_tokens,
    }
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    h.update(files_fingerprint(files).encode() + files_fingerprint(val_files).encode())
    fingerprint = h.hexdigest()
    meta = up_to_date(Path(out), fingerprint)
    if meta is not None:
        return meta
    n = count_documents(files, field, ", ".join(inputs))
    train: Callable[[], Iterable[str]]
    labelled: Callable[[], Iterable[tuple[str, str]]]
    if val_files:
        n += count_documents(val_files, field, ", ".join(val_inputs or []))

        def train():
            return documents(files, field)

        def labelled():
            return chain((("train", d) for d in train()), (("val", d) for d in documents(val_files, field)))
    elif n == 1 and val_documents is None:  # one document (held in memory anyway): split by characters
        docs = split_document(next(documents(files, field)), val_fraction)
        n = 2

        def train():
            return iter(docs["train"])

        def labelled():
            return _labelled(docs)
    else:
        first_val = n - held_out(n, val_fraction, val_documents)

        def train():
            return islice(documents(files, field), first_val)

        def labelled():
            return ((("train", "val")[i >= first_val], d) for i, d in enumerate(documents(files, field)))

    settings = (tokenizer, vocab_size, shard_tokens, ", ".join(inputs), progress, tokenizer_sample_chars)
    return write_prepared(out, fingerprint, train, labelled, n, SPLITS, *settings)


def refuse_inputs_inside(out: Path, inputs: list[str]) -> None:
    """The output folder is replaced whole: it must not hold (or be) an input."""
    final = out.resolve()
    for item in inputs:
        path = Path(item).resolve()
        if path == final or final in path.parents:
            raise DataError(f"--out {out} holds the input {item}, which writing it would delete; choose another --out")


def _labelled(docs: dict[str, list[str]]) -> Iterator[tuple[str, str]]:
    return ((split, d) for split, texts in docs.items() for d in texts)


# ---- reading prepared data ----------------------------------------------------------------------
def read_meta(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"data folder {folder} does not exist; create it with `mudd prepare`")
    path = folder / META_NAME
    if not path.is_file():
        raise DataError(f"{folder} is not a prepared data folder (no {META_NAME}); create it with `mudd prepare`")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is corrupt ({e}); run `mudd prepare` again") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} metadata file; run `mudd prepare` again")
    return meta


@dataclass
class TokenSplit:
    """The token shards of one split, memory-mapped."""

    shards: list[np.ndarray]

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def window(self, index: int, length: int) -> np.ndarray:
        """Tokens [index, index + length) of the split seen as one sequence (shards concatenated)."""
        parts = []
        for shard in self.shards:
            if index < len(shard):
                piece = shard[index : index + length - sum(len(p) for p in parts)]
                parts.append(np.asarray(piece))
                index = 0
                if sum(len(p) for p in parts) == length:
                    break
            else:
                index -= len(shard)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


def shard_problem(folder: Path, meta: dict) -> str | None:
    """Why the token shards of a prepared folder differ from what its meta.json says (None: they agree)."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    for info in meta["splits"].values():
        for shard in info["shards"]:
            path = folder / shard["file"]
            if not path.is_file():
                return f"token shard {path} is missing; run `mudd prepare` again"
            size = path.stat().st_size
            if size != shard["tokens"] * itemsize:
                return (
                    f"token shard {path} holds {size / itemsize:g} tokens, {META_NAME} says {shard['tokens']}; "
                    "it is truncated: run `mudd prepare` again"
                )
    return None


class TokenData:
    """A prepared data folder: train/val splits, vocabulary and tokenizer path."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = read_meta(folder)
        self.vocab_size: int = self.meta["vocab_size"]
        self.eot_id: int | None = self.meta.get("eot_id")
        self.splits: dict[str, TokenSplit] = {}
        problem = shard_problem(self.folder, self.meta)
        if problem:
            raise DataError(problem)
        for split, info in self.meta["splits"].items():
            shards = [
                np.memmap(self.folder / shard["file"], dtype=self.meta["dtype"], mode="r") for shard in info["shards"]
            ]
            self.splits[split] = TokenSplit(shards)

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / self.meta.get("tokenizer", TOKENIZER_NAME)

    def split(self, name: str, seq_len: int) -> TokenSplit:
        if name not in self.splits or self.splits[name].tokens < seq_len + 1:
            have = self.splits[name].tokens if name in self.splits else 0
            raise DataError(
                f"the {name} split of {self.folder} has {have} tokens, fewer than one sequence of "
                f"{seq_len + 1}; add data or lower --seq-len"
            )
        return self.splits[name]
