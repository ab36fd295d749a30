"""Text in: the bundled Shakespeare corpus (its fixed validation plays) and documents read from files."""

from __future__ import annotations

import json
import lzma
import os
from importlib import resources
from pathlib import Path

from muddformer.errors import DataError

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
