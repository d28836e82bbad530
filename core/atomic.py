"""Atomic writes: a file or a directory appears whole under its name, or not at all.

Each is written under a temporary name beside the target and renamed into place,
so a crash or an error mid-write leaves the previous version (or nothing). What a
writer killed mid-write left behind for a target (its temporary, or the previous
version moved aside) is cleaned up by the next write of that target, so writers of
one target must not run at the same time (a run directory holds a lock for that).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_text_atomically(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8), synced to disk before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path.parent, glob.escape(path.name))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_dir_atomically(target: str | Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh temporary directory with ``write(tmp)``, then rename it to ``target``.

    An existing ``target`` is moved aside first and removed only after the new one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(target.parent, glob.escape(target.name))
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sweep_temporaries(directory: str | Path, name_glob: str = "*") -> list[Path]:
    """Clean up after writers of this module that were killed mid-write in ``directory``.

    ``.NAME.*.tmp`` (a file or directory never renamed into place) is removed. ``.NAME.old``
    (a previous version moved aside) is put back when ``NAME`` itself is missing, so a kill
    between the two renames of :func:`write_dir_atomically` loses nothing, and removed
    otherwise. Only call it for a directory no other writer is using. Returns what it touched.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    touched = []
    for stale in directory.glob(f".{name_glob}.*.tmp"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        touched.append(stale)
    for old in directory.glob(f".{name_glob}.old"):
        target = directory / old.name[1:-len(".old")]
        if target.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(old, target)
        touched.append(old)
    return touched
