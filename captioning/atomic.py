"""Writes that a killed process never leaves half done: a file is written beside its target and
renamed over it (a rename within one folder is atomic), and a folder is swapped in two renames
that ``recover_swap`` can finish."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

PathLike = Union[str, Path]


def atomic_write(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; what we write is for everyone to read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = 2, newline: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + ("\n" if newline else ""))


def aside(folder: PathLike) -> Path:
    """Where ``swap_folder`` keeps the old copy of ``folder`` between its two renames."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.old")


def swap_folder(new: PathLike, folder: PathLike) -> None:
    """Put the complete folder ``new`` in the place of ``folder``. A folder cannot be renamed over
    a non-empty one, so the old copy goes aside first; a kill between the two renames leaves only
    the aside copy, which ``recover_swap`` puts back."""
    folder = Path(folder)
    old = aside(folder)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_swap(folder: PathLike) -> bool:
    """Finish a ``swap_folder`` that a kill interrupted; True if one was repaired.

    A process killed between the two renames leaves no ``folder`` but a complete ``.NAME.old``:
    put it back. (The half-written new copy, if any, is a hidden temporary folder that nothing
    reads.)"""
    folder = Path(folder)
    old = aside(folder)
    if not folder.exists() and old.is_dir():
        os.replace(old, folder)
        return True
    return False
