"""Where a bundle may be written, and the swap that puts a fully built bundle in place.

``--overwrite`` replaces only a folder that is recognisably a previous usema bundle (its marker files and
nothing an export would not write), never the run it is exported from nor a folder holding that run: a
wrong ``--output`` can cost a previous bundle, never checkpoints or unrelated files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from usema.errors import UsemaError
from usema.faults import fault_point
from usema.io.files import ensure_writable_dir
from usema.run.layout import BUNDLE_MARKERS, foreign_bundle_entries, is_bundle

# renameat2(2): flag of linux/fs.h, and the "relative to the working directory" descriptor
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def check_output(output: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an ``output`` that is a file, an input or an ancestor of one, or a folder that is not empty
    (without ``overwrite``) or not a previous bundle (with it); make sure its parent is writable."""
    target = output.resolve()
    for source in inputs:
        if source.resolve() == target or target in source.resolve().parents:
            raise UsemaError(
                f"{output}: the bundle would replace {source}, which it is exported from; choose another --output"
            )
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise UsemaError(f"{output}: expected a bundle directory, found a file or link")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise UsemaError(f"{output}: exists and is not empty; refusing to overwrite (pass --overwrite)")
        foreign = foreign_bundle_entries(output)
        if not is_bundle(output) or foreign:
            markers = ", ".join(str(m) for m in BUNDLE_MARKERS)
            found = f"; found {foreign[0].relative_to(output)}" if foreign else ""
            raise UsemaError(
                f"{output}: --overwrite replaces only a previous usema bundle ({markers} and nothing else){found}"
            )
    ensure_writable_dir(output.parent, "folder for the bundle")


@contextlib.contextmanager
def build_beside(output: Path) -> Iterator[Path]:
    """A new private-named folder beside ``output`` to build the bundle in; removed on exit unless swapped in."""
    build = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    build.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
    try:
        yield build
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    C library or the file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(built: Path, output: Path) -> None:
    """Put ``built`` at ``output``. An old ``output`` is exchanged with ``built`` atomically, so a process killed
    at any moment leaves the old bundle or the new one, complete; the old one then lies at ``built``, which
    ``build_beside`` removes. Where no atomic exchange exists, the old one is moved aside first."""
    fault_point("bundle.swap")
    if not output.exists():
        built.rename(output)
    elif _exchange(built, output):
        fault_point("bundle.swapped")
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        output.rename(old / output.name)
        built.rename(output)
        shutil.rmtree(old)
