"""The text `mudd analyze` probes: the bundled validation plays or a file, cut into sequences; sink tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from muddformer.data.corpus import BUNDLED, cache_dir
from muddformer.data.shards import META_NAME, TokenData, bundled_data_dir
from muddformer.data.tokenizers import EOT, eot_id, load_tokenizer
from muddformer.errors import InputError


def bundled_validation_tokens(tokenizer_path: Path, folder: str, max_tokens: int) -> list[int] | None:
    """The first tokens of the bundled corpus's validation split, when `tokenizer_path` is the tokenizer
    the bundled corpus was prepared with (as training does); None otherwise.

    The prepared corpus is compared when it is cached; it is prepared (a BPE training) only for a
    checkpoint whose run says it trained on the bundled corpus, not for every tokenizer that might be it.
    """

    tok = load_tokenizer(tokenizer_path)
    if eot_id(tok) != 0:  # a tokenizer trained on the bundled corpus has <|endoftext|> as id 0
        return None
    vocab = tok.get_vocab_size()
    prepared = cache_dir() / "data" / f"{BUNDLED}-bpe{vocab}"  # where bundled_data_dir keeps it
    if not (prepared / META_NAME).is_file():
        if not trained_on_bundled(folder):
            return None
        prepared = bundled_data_dir(vocab)
    data = TokenData(prepared)
    if json.loads(data.tokenizer_path.read_text()) != json.loads(Path(tokenizer_path).read_text()):
        return None
    val = data.splits["val"]
    return val.window(0, min(max_tokens, val.tokens)).astype(np.int64).tolist()


def trained_on_bundled(folder: str) -> bool:
    """True when the run that wrote this checkpoint (run.json of RUN/checkpoints/step_N) used the bundled corpus."""
    run = Path(folder).resolve().parent.parent / "run.json"
    try:
        source = json.loads(run.read_text()).get("data_meta", {}).get("source", "")
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return source == f"bundled:{BUNDLED}"


def text_tokens(
    tokenizer, tokenizer_path: Path, text: str | None, max_tokens: int, folder: str
) -> tuple[list[int], str]:
    """Token ids (at most max_tokens) of the text file, or of the bundled validation split; and a source label."""
    if text is not None:
        path = Path(text)
        if not path.is_file():
            raise InputError(f"text file {path} does not exist")
        ids = tokenizer.encode(path.read_text(encoding="utf-8")).ids[:max_tokens]
        if not ids:
            raise InputError(f"text file {path} encodes to no tokens")
        return ids, str(path)
    ids = bundled_validation_tokens(tokenizer_path, folder, max_tokens)
    if ids is None:
        raise InputError(
            f"{folder} does not use the bundled corpus's tokenizer, so there is no default text; pass --text FILE"
        )
    return ids, "bundled corpus, validation split"


def cut_sequences(ids: list[int], seq_len: int, sink_positions: int) -> torch.Tensor:
    """Consecutive sequences of seq_len tokens (N, seq_len); a text shorter than one is a single sequence."""
    n = len(ids) // seq_len
    if n == 0:
        if len(ids) <= sink_positions:
            raise InputError(f"the text has {len(ids)} tokens, too few beyond the {sink_positions} sink positions")
        return torch.tensor([ids], dtype=torch.long)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def parse_sink_tokens(spec: str) -> list[str]:
    """Comma-separated strings; \\n and \\t stand for newline and tab."""
    return [s.replace("\\n", "\n").replace("\\t", "\t") for s in spec.split(",") if s]


def sink_tokens(tokenizer, tokenizer_path: Path, strings: list[str]) -> dict[str, int]:
    """Token ids of the strings that are one token each, plus the tokenizer's bos token when it has one."""
    found = {}
    for s in strings:
        ids = tokenizer.encode(s, add_special_tokens=False).ids
        if len(ids) == 1:
            found[s] = ids[0]
    bos = _bos_token(tokenizer_path)
    if bos is not None and tokenizer.token_to_id(bos) is not None:
        found[bos] = tokenizer.token_to_id(bos)
    return found


def _bos_token(tokenizer_path: Path) -> str | None:
    """The bos token named by tokenizer_config.json beside the tokenizer, else <|endoftext|>."""
    config = tokenizer_path.parent / "tokenizer_config.json"
    if config.is_file():
        try:
            bos = json.loads(config.read_text()).get("bos_token")
        except json.JSONDecodeError:
            bos = None
        if isinstance(bos, dict):
            bos = bos.get("content")
        if isinstance(bos, str):
            return bos
    return EOT
