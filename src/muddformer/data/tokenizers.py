"""Tokenizers: the byte-level BPE trained for a corpus, loading, the end-of-text id, the file beside a model."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from muddformer.errors import DataError

EOT = "<|endoftext|>"


TOKENIZER_NAME = "tokenizer.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer with one special token, <|endoftext|> (id 0)."""
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


def tokenizer_json(path: str | os.PathLike) -> Path:
    """The tokenizer.json that `path` names: the file itself, or the one in that folder."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist; pass a tokenizer.json or a folder that holds one")
    return path


def load_tokenizer(path: str | os.PathLike):
    path = tokenizer_json(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception on bad JSON
        raise DataError(f"cannot read tokenizer {path} ({e})") from None


def eot_id(tok) -> int | None:
    return tok.token_to_id(EOT)


def export_tokenizer(tokenizer: str | os.PathLike, folder: str | os.PathLike, model_max_length: int) -> None:
    """Copy a tokenizer.json (the file, or the one in a folder) into a model folder with the
    tokenizer_config.json that AutoTokenizer reads."""
    folder, source = Path(folder), tokenizer_json(tokenizer)
    tok = load_tokenizer(source)
    shutil.copyfile(source, folder / TOKENIZER_NAME)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length}
    if eot_id(tok) is not None:
        config.update(eos_token=EOT, bos_token=EOT)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def tokenizer_file(model: str | Path, tokenizer: str | Path | None) -> Path:
    """The tokenizer.json to use with a model folder: the given file (or folder), else the folder's own."""
    if tokenizer:
        return tokenizer_json(tokenizer)
    path = Path(model) / TOKENIZER_NAME
    if not path.is_file():
        raise DataError(f"{model} has no {TOKENIZER_NAME}; pass --tokenizer FILE")
    return path
