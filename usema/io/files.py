"""Writing results safely: atomic file writes and the one output-folder check.

Every result file (checkpoint, image, CSV, JSON, plot) is written through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from usema.errors import UsemaError, os_reason


def ensure_writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create directory ``path`` (and parents) now, so that an unusable output fails before any work is done.

    Raises UsemaError naming ``path`` when it is a file, cannot be created, or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsemaError(f"{path}: expected the {what} to be a directory, found a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsemaError(f"{path}: cannot create the {what} ({os_reason(exc)})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsemaError(f"{path}: the {what} is not writable")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "result") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path`` (atomic on POSIX).

    A crash, SIGKILL or exception while writing leaves ``path`` untouched (the old file, or nothing).
    The temporary name keeps the original suffix(es) so that writers choosing a format by extension
    (nibabel, SimpleITK, PIL) still work. An OSError (no such folder, no permission, disk full) while
    preparing, writing or renaming becomes a one-line UsemaError naming ``path`` and ``what`` it holds.
    """
    path = Path(path)
    try:
        with _temporary_beside(path) as tmp_path:
            yield tmp_path
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; results get the usual permissions
            os.replace(tmp_path, path)
    except OSError as exc:
        raise UsemaError(f"{path}: could not write the {what} ({os_reason(exc)}); the previous one is kept") from exc


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """An empty temporary file in ``path``'s folder (created if needed), removed on exit unless renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.removesuffix(suffix)}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def refuse_existing(paths: Iterable[str | os.PathLike], overwrite: bool, what: str = "result") -> None:
    """The one "refuse to overwrite" rule: a UsemaError naming the first existing path unless ``overwrite``."""
    if overwrite:
        return
    for path in paths:
        if os.path.lexists(path):
            raise UsemaError(f"{path}: already exists; refusing to overwrite the {what} (pass --overwrite to replace it)")
