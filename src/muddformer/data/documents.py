"""Documents read from files, streamed: a corpus of any size is read a batch at a time, never whole.

Formats, by file name: `.txt` and `.md` (the whole file is one document), `.jsonl` (the `field` of each line's
record) and `.parquet` (the `field` column, read in row batches; needs pyarrow). A `.gz`, `.bz2`, `.xz` or
`.zst` ending on any of the text formats is decompressed on the fly (`.zst` needs the zstandard package, or
Python >= 3.14). Folders are searched recursively for those files, in sorted order.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from muddformer.errors import DataError

TEXT_FORMATS = (".txt", ".md", ".jsonl")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
PARQUET = ".parquet"
PARQUET_ROWS = 1024  # rows of a parquet file read at a time


def document_format(path: Path) -> tuple[str, str] | None:
    """(format, compression) of a file by its name: ('.jsonl', '.gz') for data.jsonl.gz; None: not a document file."""
    name = path.name.lower()
    if name.endswith(PARQUET):
        return PARQUET, ""
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), "")
    stem = name[: len(name) - len(compression)]
    fmt = next((f for f in TEXT_FORMATS if stem.endswith(f)), None)
    return (fmt, compression) if fmt else None


def input_files(inputs: list[str]) -> list[Path]:
    """The document files that `inputs` name: files as given, folders searched for every known format."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and document_format(p))
            if not found:
                raise DataError(f"folder {path} holds no .txt, .md, .jsonl or .parquet files (plain or compressed)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"data path {path} does not exist")
    return files


def open_text(path: Path, compression: str) -> IO[str]:
    """A text stream of the file, decompressed as its name says."""
    if compression == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if compression == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    if compression == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    if compression == ".zst":
        return io.TextIOWrapper(zstd_reader(path), encoding="utf-8")
    return open(path, encoding="utf-8")


def zstd_reader(path: Path) -> IO[bytes]:
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python >= 3.14

        return zstd.open(path, "rb")
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise DataError(f"reading {path} needs the zstandard package: pip install zstandard") from None
    return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)


def file_documents(path: Path, field: str) -> Iterator[str]:
    """The documents of one file, in order (empty ones included; `documents` drops them)."""
    kind = document_format(path) or (".txt", "")  # a file named explicitly is text unless its name says otherwise
    fmt, compression = kind
    if fmt == PARQUET:
        yield from parquet_documents(path, field)
        return
    try:
        with open_text(path, compression) as f:
            if fmt != ".jsonl":
                yield f.read()
                return
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield jsonl_field(line, field, path, lineno)
    except (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError) as e:
        raise DataError(f"cannot read {path} ({e}); is it a {fmt}{compression} file?") from None


def jsonl_field(line: str, field: str, path: Path, lineno: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise DataError(f"{path}:{lineno} is not valid JSON") from None
    if not isinstance(record, dict) or field not in record:
        raise DataError(f"{path}:{lineno} has no field {field!r}; pass --field with the text field's name")
    return str(record[field])


def parquet_documents(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs the pyarrow package: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors have no common public base
        raise DataError(f"cannot read {path} ({e}); is it a parquet file?") from None
    if field not in table.schema_arrow.names:
        raise DataError(
            f"{path} has no column {field!r} (it has {', '.join(table.schema_arrow.names)}); pass --field "
            "with the text column's name"
        )
    for batch in table.iter_batches(batch_size=PARQUET_ROWS, columns=[field]):
        for value in batch.column(0).to_pylist():
            yield "" if value is None else str(value)


def documents(files: list[Path], field: str = "text") -> Iterator[str]:
    """Every non-empty document of the files, in order."""
    for path in files:
        for doc in file_documents(path, field):
            if doc.strip():
                yield doc


def count_documents(files: list[Path], field: str, names: str) -> int:
    """How many non-empty documents the files hold; an error if none."""
    n = sum(1 for _ in documents(files, field))
    if n == 0:
        raise DataError(f"no text found in {names}; the data is empty")
    return n


def files_fingerprint(files: list[Path]) -> str:
    """A hash of the files' bytes, in order: their documents are the same when it is (cheaper than parsing)."""
    h = hashlib.sha256()
    for path in files:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        h.update(digest.digest())
    return h.hexdigest()


def held_out(n: int, val_fraction: float, val_documents: int | None) -> int:
    """How many documents, from the end, are held out for validation: `val_documents`, or the share."""
    if val_documents is not None:
        if not 0 < val_documents < n:
            raise DataError(f"--val-documents must be between 1 and {n - 1} (the data has {n} documents)")
        return val_documents
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    return max(1, round(n * val_fraction))


def split_document(doc: str, val_fraction: float) -> dict[str, list[str]]:
    """A single document is split by characters: its last `val_fraction` is held out."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(doc) * (1 - val_fraction))
    return {"train": [doc[:cut]], "val": [doc[cut:]]}
