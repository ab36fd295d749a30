"""Small helpers every layer uses: atomic file writes, a folder lock, the device name, the float32-at-least upcast.

Every file is written atomically (temporary name, then rename), so a crash never leaves a half file where a
good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, folders are not guarded
    fcntl = None  # type: ignore[assignment]


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to `path` (its folder made if missing); on success it replaces `path`, on error
    it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the mode a plain open() would
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder next to `path`; on success it replaces `path` whole, on error it is removed."""
    final = os.path.abspath(path)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(final) + ".", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


LOCK_NAME = ".lock"


@contextmanager
def exclusive_folder(folder: str | os.PathLike, error: type[Exception]) -> Iterator[None]:
    """Hold an advisory lock on `folder` (its `.lock` file) for the block, so that a second process given the same
    folder stops with `error` instead of writing the same checkpoints and logs. The kernel drops the lock when its
    holder exits, a killed one included, so nothing is left to clean up. Without fcntl (Windows) nothing is locked."""
    if fcntl is None:
        yield
        return
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise error(f"{folder} is a file, not a folder; pass another --out")
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise error(
                f"{folder} is in use by another process (pid {holder}); wait for it to finish or stop it, "
                "or pass another --out"
            ) from None
        held = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
        if held and created and os.listdir(folder) == [LOCK_NAME]:  # the block wrote nothing: leave no trace
            shutil.rmtree(folder, ignore_errors=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str, obj: object) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def resolve_device(name: str) -> str:
    """ "auto" -> cuda when available, else cpu; any other name as given."""
    return name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 when it is narrower (bfloat16, float16); a float64 model keeps its precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@contextmanager
def fork_default_device_rng() -> Iterator[None]:
    """Run the body with the CPU's random generator, and the default device's where that is an accelerator,
    restored afterwards: what the body draws leaves every later draw unchanged."""
    device = torch.get_default_device()
    if device.type in ("cpu", "meta"):
        with torch.random.fork_rng(devices=[]):
            yield
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else getattr(module, "current_device", lambda: 0)()  # mps: none
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        yield
