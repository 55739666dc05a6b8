"""Write an output directory all at once: built under a temporary name beside it, renamed into place at the end.

A failure (or Ctrl-C) removes the temporary directory, so no partial output is ever left where a user would
take it for a finished one; an existing directory is replaced only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _normal_permissions(path: Path) -> None:
    """mkdtemp makes a private (0700) directory; give the output the permissions of a normal mkdir."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for f in path.iterdir():
        os.chmod(f, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes ``out`` (replacing an existing one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory ``tmp`` (beside ``out``) to ``out``, replacing an existing ``out`` only now."""
    _normal_permissions(tmp)
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Have ``write`` fill a temporary file beside ``path``, then rename it over ``path``: readers see the old
    file or the new one, never half of one (the name holds the process id: two writers never share it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
