"""Files in and out: the one input-file check, and safe result writes.

Every input file is opened through :func:`check_input_file` / :func:`open_input` (a regular file, inside
its folder, never blocking); every result file (checkpoint, image, CSV, JSON, plot) is written through
:func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from usema.errors import UsemaError, os_reason
from usema.faults import fault_point


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
            fault_point(f"{what}.flushed")  # e.g. checkpoint.flushed (usema.faults)
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


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_input_file(path: str | os.PathLike, inside: str | os.PathLike | None = None, what: str = "file") -> Path:
    """The one check every reader passes: ``path`` is a regular file (after links), written inside ``inside``.

    ``inside`` is checked on the path as written (no ``..`` or absolute escape); links inside the folder may
    point elsewhere, as datasets are often assembled from links, but never at a FIFO, device or socket: those
    would hang a reader or feed it endless bytes. Raises UsemaError naming ``path``.
    """
    path = Path(path)
    if inside is not None:
        folder = os.path.normpath(os.path.abspath(inside))
        if os.path.commonpath([os.path.normpath(os.path.abspath(path)), folder]) != folder:
            raise UsemaError(f"{path}: expected the {what} inside {inside}")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UsemaError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise UsemaError(f"{path}: cannot read the {what} ({os_reason(exc)})") from exc
    if not stat.S_ISREG(mode):
        raise UsemaError(f"{path}: expected the {what} to be a regular file, found {_kind(mode)}")
    return path


def open_input(path: str | os.PathLike, inside: str | os.PathLike | None = None, what: str = "file") -> BinaryIO:
    """Open a checked input for binary reading without ever blocking (O_NONBLOCK; re-checked on the open file).

    The second check on the descriptor closes the gap between ``check_input_file`` and the open.
    """
    path = check_input_file(path, inside, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UsemaError(f"{path}: cannot read the {what} ({os_reason(exc)})") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UsemaError(f"{path}: expected the {what} to be a regular file, found {_kind(mode)}")
    return os.fdopen(fd, "rb")


def read_input_text(path: str | os.PathLike, max_bytes: int, inside: str | os.PathLike | None = None,
                    what: str = "file") -> str:
    """The UTF-8 text of a checked input of at most ``max_bytes`` bytes (refused beyond, before reading it all)."""
    with open_input(path, inside, what) as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UsemaError(f"{path}: expected a {what} of at most {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsemaError(f"{path}: expected a UTF-8 text {what} ({exc.reason} at byte {exc.start})") from None
