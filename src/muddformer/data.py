"""Data: the bundled corpus, tokenizers, and memory-mapped token shards.

A prepared data folder holds `meta.json`, `tokenizer.json` and token shards
`{split}-{i:05d}.bin` (uint16 when the vocabulary fits, else uint32; documents separated by the
end-of-text token). `prepare` writes the folder atomically and is idempotent: re-running with the
same inputs and options leaves it as it is.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .checkpoints import atomic_dir
from .errors import MuddError

EOT = "<|endoftext|>"
META_NAME = "meta.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT = "mudd-tokens"
FORMAT_VERSION = 1
BUNDLED = "shakespeare"
# Fixed validation split by play: one comedy, one Roman play, one romance (about 7 % of the text).
VALIDATION_PLAYS = ("twelfth-night", "julius-caesar", "the-tempest")
DEFAULT_SHARD_TOKENS = 100_000_000


class DataError(MuddError):
    """Missing, empty or inconsistent data."""


# ---- the bundled corpus -----------------------------------------------------------------------
def bundled_plays() -> list[dict]:
    """The 38 plays of the bundled corpus: dicts with name, genre, title and plain text."""
    path = resources.files("muddformer") / "corpus" / "shakespeare.jsonl.xz"
    with lzma.open(path.open("rb"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def bundled_split(split: str) -> list[str]:
    """Texts of the bundled corpus's train or val split (split by play)."""
    plays = bundled_plays()
    if split == "val":
        return [p["text"] for p in plays if p["name"] in VALIDATION_PLAYS]
    return [p["text"] for p in plays if p["name"] not in VALIDATION_PLAYS]


def cache_dir() -> Path:
    return Path(os.environ.get("MUDD_CACHE", Path.home() / ".cache" / "muddformer"))


def bundled_data_dir(vocab_size: int = 8192) -> Path:
    """The bundled corpus prepared with an 8k (or given) byte-level BPE, cached after the first call."""
    out = cache_dir() / "data" / f"{BUNDLED}-bpe{vocab_size}"
    docs = {"train": bundled_split("train"), "val": bundled_split("val")}
    prepare_documents(docs, out, vocab_size=vocab_size, source=f"bundled:{BUNDLED}")
    return out


# ---- tokenizers ---------------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer with one special token, <|endoftext|> (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise DataError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least 258")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | os.PathLike):
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist; pass a tokenizer.json or a folder that holds one")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception on bad JSON
        raise DataError(f"cannot read tokenizer {path} ({e})") from None


def eot_id(tok) -> int | None:
    return tok.token_to_id(EOT)


def export_tokenizer(tokenizer_json: str | os.PathLike, folder: str | os.PathLike, model_max_length: int) -> None:
    """Copy tokenizer.json into a model folder with the tokenizer_config.json that AutoTokenizer reads."""
    folder = Path(folder)
    tok = load_tokenizer(tokenizer_json)
    shutil.copyfile(tokenizer_json, folder / TOKENIZER_NAME)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length}
    if eot_id(tok) is not None:
        config.update(eos_token=EOT, bos_token=EOT)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---- reading inputs -----------------------------------------------------------------------------
def read_documents(inputs: list[str], field: str = "text") -> list[str]:
    """Documents from text files (one document each), .jsonl files (`field` of each line) or folders of them."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl", ".md"))
            if not found:
                raise DataError(f"folder {path} holds no .txt, .md or .jsonl files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"data path {path} does not exist")
    docs: list[str] = []
    for path in files:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise DataError(f"{path}:{lineno} is not valid JSON") from None
                    if not isinstance(record, dict) or field not in record:
                        raise DataError(
                            f"{path}:{lineno} has no field {field!r}; pass --field with the text field's name"
                        )
                    docs.append(str(record[field]))
        else:
            docs.append(path.read_text(encoding="utf-8"))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"no text found in {', '.join(inputs)}; the data is empty")
    return docs


def split_documents(docs: list[str], val_fraction: float) -> dict[str, list[str]]:
    """Hold out whole documents from the end for validation; a single document is split by characters."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) == 1:
        cut = int(len(docs[0]) * (1 - val_fraction))
        return {"train": [docs[0][:cut]], "val": [docs[0][cut:]]}
    n_val = max(1, round(len(docs) * val_fraction))
    return {"train": docs[:-n_val], "val": docs[-n_val:]}


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
    tok_text = Path(tokenizer).read_text() if tokenizer else None
    if tokenizer is not None:
        load_tokenizer(tokenizer)  # fail early on a bad file
    fingerprint = _fingerprint(
        docs, {"tokenizer": tok_text, "vocab_size": None if tok_text else vocab_size, "shard_tokens": shard_tokens}
    )
    meta_path = out / META_NAME
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("fingerprint") == fingerprint:
                return meta
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
    from tqdm import tqdm

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


class TokenData:
    """A prepared data folder: train/val splits, vocabulary and tokenizer path."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = read_meta(folder)
        self.vocab_size: int = self.meta["vocab_size"]
        self.eot_id: int | None = self.meta.get("eot_id")
        self.splits: dict[str, TokenSplit] = {}
        for split, info in self.meta["splits"].items():
            shards = []
            for shard in info["shards"]:
                path = self.folder / shard["file"]
                if not path.is_file():
                    raise DataError(f"token shard {path} is missing; run `mudd prepare` again")
                arr = np.memmap(path, dtype=self.meta["dtype"], mode="r")
                if len(arr) != shard["tokens"]:
                    raise DataError(
                        f"token shard {path} holds {len(arr)} tokens, {META_NAME} says {shard['tokens']}; "
                        "it is truncated: run `mudd prepare` again"
                    )
                shards.append(arr)
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


def sample_batch(
    split: TokenSplit,
    seq_len: int,
    batch_size: int,
    seed: int,
    step: int,
    rank: int = 0,
    world: int = 1,
    micro: int = 0,
    accum: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, targets) rows of one rank for one micro-batch of one step: random windows.

    The step's global batch (batch_size x world x accum windows) depends only on (seed, step), so a
    resumed run reads exactly what an uninterrupted one would, and N ranks (or N micro-batches) of
    batch b read the same rows as one rank of batch N*b.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, split.tokens - seq_len, (batch_size * world * accum,), generator=g)
    first = (micro * world + rank) * batch_size
    rows = starts[first : first + batch_size]
    x = torch.from_numpy(np.stack([split.window(int(s), seq_len + 1).astype(np.int64) for s in rows]))
    return x[:, :-1], x[:, 1:]


def eval_windows(split: TokenSplit, seq_len: int, max_windows: int) -> list[int]:
    """Fixed, evenly spaced window starts covering the split for validation."""
    n = max(1, min(max_windows, (split.tokens - 1) // seq_len))
    last = split.tokens - seq_len - 1
    return [round(i * last / max(1, n - 1)) if n > 1 else 0 for i in range(n)]


def iter_eval_batches(
    split: TokenSplit, seq_len: int, batch_size: int, starts: list[int]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(starts), batch_size):
        x = torch.from_numpy(
            np.stack([split.window(s, seq_len + 1).astype(np.int64) for s in starts[i : i + batch_size]])
        )
        yield x[:, :-1], x[:, 1:]
