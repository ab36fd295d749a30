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
import importlib
import importlib.util
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
            refuse_copies(found)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"data path {path} does not exist")
    return files


def refuse_copies(files: list[Path]) -> None:
    """A folder's a.jsonl beside a.jsonl.gz is most likely one file kept twice: its documents would be read twice
    (and held-out documents could repeat training ones)."""
    seen: dict[str, Path] = {}
    for path in files:
        compression = document_format(path)[1]  # type: ignore[index]  # the folder's files all have a format
        plain = str(path)[: len(str(path)) - len(compression)].lower()
        if plain in seen:
            raise DataError(f"{seen[plain]} and {path} look like one file, plain and compressed; keep one of them")
        seen[plain] = path


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
        from compression import zstd  # type: ignore[import-not-found]  # Python >= 3.14: raises on a truncated file

        return zstd.open(path, "rb")
    except ImportError:
        pass
    return io.BufferedReader(ZstdFrames(path, optional_module("zstandard", path)))


def optional_module(name: str, path: Path):
    """The module `name`, imported to read `path`. Missing, or installed but failing to import (a wheel built
    for another numpy, say): a one-line DataError that says which, with the pip command."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        package = name.split(".")[0]
        try:
            missing = importlib.util.find_spec(package) is None
        except ValueError:  # in sys.modules without a spec: there, but not importable as a package
            missing = False
        if missing:
            raise DataError(f"reading {path} needs the {package} package: pip install {package}") from None
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]  # numpy's errors run over many lines
        raise DataError(
            f"reading {path} needs {package}, which is installed but fails to import ({reason}); "
            f"upgrade it: pip install -U {package}"
        ) from None


class ZstdFrames(io.RawIOBase):
    """A .zst file's bytes decompressed frame after frame. A file that ends inside a frame is an error, where the
    zstandard package's own reader would end the text early without one."""

    def __init__(self, path: Path, zstandard):
        self.file, self.errors = open(path, "rb"), zstandard.ZstdError
        self.decompressor = zstandard.ZstdDecompressor()
        self.frame, self.in_frame, self.out = self.decompressor.decompressobj(), False, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.out:
            data = self.file.read(1 << 20)
            if not data:
                if self.in_frame:
                    raise EOFError("the file ends inside a zstd frame: it is truncated")
                return 0
            self.out = self.decompress(data)
        n = min(len(buffer), len(self.out))
        buffer[:n], self.out = self.out[:n], self.out[n:]
        return n

    def decompress(self, data: bytes) -> bytes:
        parts = []
        try:
            while data:
                parts.append(self.frame.decompress(data))
                self.in_frame = not self.frame.eof
                if self.in_frame:
                    break
                data, self.frame = self.frame.unused_data, self.decompressor.decompressobj()
        except self.errors as e:
            raise OSError(f"zstd: {e}") from None
        return b"".join(parts)

    def close(self) -> None:
        self.file.close()
        super().close()


def file_documents(path: Path, field: str) -> Iterator[str]:
    """The documents of one file, in order (empty ones included; `documents` drops them)."""
    kind = document_format(path) or (".txt", "")  # a file named explicitly is text unless its name says otherwise
    fmt, compression = kind
    try:
        if fmt == PARQUET:
            yield from parquet_documents(path, field)
            return
        with open_text(path, compression) as f:
            if fmt != ".jsonl":
                yield f.read()
                return
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield jsonl_field(line, field, path, lineno)
    except DataError:
        raise
    except Exception as e:  # zlib, lzma, zstd, pyarrow and decoding errors share no base but Exception
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}); is it a {fmt}{compression} file?") from None


def jsonl_field(line: str, field: str, path: Path, lineno: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise DataError(f"{path}:{lineno} is not valid JSON") from None
    if not isinstance(record, dict) or field not in record:
        raise DataError(f"{path}:{lineno} has no field {field!r}; pass --field with the text field's name")
    return text_value(record[field], f"{path}:{lineno}'s field {field!r}")


def text_value(value, where: str) -> str:
    """A document's text: a string, or None (no text: skipped); anything else is an error, not its repr."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where} holds {type(value).__name__}, not text; pass --field with the text's name")
    return value


def parquet_documents(path: Path, field: str) -> Iterator[str]:
    pa, pq = optional_module("pyarrow", path), optional_module("pyarrow.parquet", path)
    table = pq.ParquetFile(path)
    schema = table.schema_arrow
    if field not in schema.names:
        raise DataError(
            f"{path} has no column {field!r} (it has {', '.join(schema.names)}); pass --field with the text "
            "column's name"
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}'s column {field!r} holds {kind}, not text; pass --field with the text column's name")
    for batch in table.iter_batches(batch_size=PARQUET_ROWS, columns=[field]):
        for value in batch.column(0).to_pylist():
            yield value or ""


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
    """A hash of the files' bytes and formats (their names say how they are read), in order: their documents are
    the same when it is (cheaper than parsing)."""
    h = hashlib.sha256()
    for path in files:
        h.update("".join(document_format(path) or (".txt", "")).encode() + b"\0")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        h.update(digest.digest())
    return h.hexdigest()


def held_out(n: int, val_fraction: float, val_documents: int | None) -> int:
    """How many documents, from the end, are held out for validation: `val_documents`, or the share (in (0, 1),
    checked by `prepare`); at least one is left for training."""
    if val_documents is not None:
        if n < 2:
            raise DataError("--val-documents needs two documents or more; one document is split by --val-fraction")
        if not 0 < val_documents < n:
            raise DataError(f"--val-documents must be between 1 and {n - 1} (the data has {n} documents)")
        return val_documents
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise DataError(f"--val-fraction {val_fraction} of {n} documents holds out all of them; lower it")
    return n_val


def split_document(doc: str, val_fraction: float) -> dict[str, list[str]]:
    """A single document is split by characters: its last `val_fraction` is held out."""
    cut = int(len(doc) * (1 - val_fraction))
    return {"train": [doc[:cut]], "val": [doc[cut:]]}
