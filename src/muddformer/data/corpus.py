"""Text in: the bundled Shakespeare corpus (its fixed validation plays) and the cache folder it is prepared into."""

from __future__ import annotations

import json
import lzma
import os
from importlib import resources
from pathlib import Path

BUNDLED = "shakespeare"


# Fixed validation split by play: one comedy, one Roman play, one romance (about 7 % of the text).
VALIDATION_PLAYS = ("twelfth-night", "julius-caesar", "the-tempest")


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
    """MUDD_CACHE, or ~/.cache/muddformer when it is unset or empty (an empty one would mean the current folder)."""
    return Path(os.environ.get("MUDD_CACHE") or Path.home() / ".cache" / "muddformer")
