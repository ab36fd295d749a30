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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from muddformer._utils import atomic_dir
from muddformer.data.corpus import BUNDLED, bundled_split, cache_dir, read_documents, split_documents
from muddformer.data.tokenizers import TOKENIZER_NAME, eot_id, load_tokenizer, tokenizer_json, train_tokenizer
from muddformer.errors import DataError

META_NAME = "meta.json"
FORMAT = "mudd-tokens"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000


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
) -> dict:
    """Tokenise split documents into `out`; returns its metadata. Skips the work if `out` is up to date."""
    out = Path(out)
    tok_text = None
    if tokenizer is not None:
        load_tokenizer(tokenizer)  # fail early on a missing or bad file
        tok_text = tokenizer_json(tokenizer).read_text()
    fingerprint = _fingerprint(
        docs, {"tokenizer": tok_text, "vocab_size": None if tok_text else vocab_size, "shard_tokens": shard_tokens}
    )
    meta_path = out / META_NAME
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            tokenizer_kept = (out / meta.get("tokenizer", TOKENIZER_NAME)).is_file()
            if meta.get("fingerprint") == fingerprint and tokenizer_kept and shard_problem(out, meta) is None:
                return meta  # else prepared again, which also repairs missing or truncated files
        except json.JSONDecodeError:
            pass
    tok = load_tokenizer(tokenizer) if tokenizer else train_tokenizer(docs["train"], vocab_size)
    eot = eot_id(tok)
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    with atomic_dir(out) as tmp_name:
        tmp = Path(tmp_name)
        splits = {
            split: _write_split(tok, texts, eot, dtype, tmp, split, shard_tokens, progress)
            for split, texts in docs.items()
        }
        tok.save(str(tmp / TOKENIZER_NAME))
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "vocab_size": vocab,
            "dtype": np.dtype(dtype).name,
            "eot_id": eot,
            "splits": splits,
            "tokenizer": TOKENIZER_NAME,
            "source": source,
            "fingerprint": fingerprint,
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _write_split(
    tok, texts: list[str], eot: int | None, dtype, folder: Path, split: str, shard_tokens: int, progress: bool
) -> dict:

    shards, buf, total = [], [], 0

    def flush() -> None:
        name = f"{split}-{len(shards):05d}.bin"
        np.concatenate(buf).astype(dtype).tofile(folder / name)
        shards.append({"file": name, "tokens": int(sum(len(b) for b in buf))})
        buf.clear()

    pending = 0
    batch = 64
    bar = tqdm(total=len(texts), desc=f"tokenising {split}", unit="doc", disable=not progress)
    for start in range(0, len(texts), batch):
        for enc in tok.encode_batch(texts[start : start + batch]):
            ids = enc.ids + ([eot] if eot is not None else [])
            buf.append(np.asarray(ids, dtype=np.int64))
            pending += len(ids)
            total += len(ids)
            if pending >= shard_tokens:
                flush()
                pending = 0
        bar.update(min(batch, len(texts) - start))
    bar.close()
    if buf:
        flush()
    return {"shards": shards, "tokens": total}


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
) -> dict:
    """`mudd prepare`: read text/.jsonl inputs, split off validation, tokenise into shards."""
    docs = read_documents(inputs, field)
    split = (
        {"train": docs, "val": read_documents(val_inputs, field)} if val_inputs else split_documents(docs, val_fraction)
    )
    return prepare_documents(
        split,
        out,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        shard_tokens=shard_tokens,
        source=", ".join(inputs),
        progress=progress,
    )


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
