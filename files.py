"""Writing files the user keeps: atomic, and never over an existing file unless asked.

One home for the rule every saving node follows (Save Quantized, Save Codebook, Save Tokens):
the bytes go to a temporary file in the destination folder first, then get their final name
with a hard link, which fails instead of replacing a file that appeared meanwhile. Where hard
links are not supported (some network or FAT file systems), an existence check and a rename
are used instead.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def _place(tmp: str, final: Path, overwrite: bool) -> None:
    """Give ``tmp`` the name ``final``; ``FileExistsError`` if taken and not ``overwrite``."""
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system
        if final.exists():
            raise FileExistsError(str(final)) from None
        os.replace(tmp, final)


def _with_temp(folder: Path, write: Callable[[str], None], place: Callable[[str], Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # A fresh name rather than mkstemp: the writer creates the file, so it gets the user's
    # usual permissions (mkstemp's are owner-only).
    tmp = str(folder / f".accel-{uuid.uuid4().hex}.part")
    try:
        write(tmp)
        return place(tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bytes_writer(data: bytes) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return write


def write_atomic(path: str | Path, write: Callable[[str], None] | bytes, overwrite: bool = False) -> Path:
    """Create ``path`` from ``write(tmp_path)`` (or the given bytes) in one step.

    Raises ``FileExistsError`` when ``path`` exists and ``overwrite`` is false; a failed write
    leaves neither a partial file nor a changed old one.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(str(path))
    writer = _bytes_writer(write) if isinstance(write, bytes) else write

    def place(tmp: str) -> Path:
        _place(tmp, path, overwrite)
        return path
    return _with_temp(path.parent, writer, place)


def write_new(folder: str | Path, stem: str, ext: str, data: bytes, counter: int | None = None) -> Path:
    """Write ``data`` to ``folder/stem_NNNNN_ext`` with the first free counter (ComfyUI's naming)."""
    folder = Path(folder)

    def place(tmp: str) -> Path:
        n = counter if counter is not None else 1
        for _ in range(100000):
            final = folder / f"{stem}_{n:05}_{ext}"
            if not final.exists():
                try:
                    _place(tmp, final, overwrite=False)
                    return final
                except FileExistsError:
                    pass
            n += 1
        raise FileExistsError(f"no free file name for {stem} in {folder}")
    return _with_temp(folder, _bytes_writer(data), place)
