"""Files the pack writes and reads: atomic new files, names kept inside a folder, cached listings.

One home for the rules every node follows:

- Writing (saved models, codebooks, tokens, JSON reports): the bytes go to a temporary file in
  the destination folder, are flushed to disk, then get their final name with a hard link,
  which fails instead of replacing a file that appeared meanwhile. Without hard links (FAT,
  some network shares) the name is first reserved with an exclusive create and the temporary
  file renamed over that reservation, so someone else's file is never replaced there either.
- Reading a user-named file: :func:`inside` resolves ``..`` and symbolic links and says whether
  the result stays in the folder it must be in, before anything opens it.
- Listing a folder: :func:`listing` walks it once, then only checks the folders' times.
"""
from __future__ import annotations

import errno
import json
import math
import os
import uuid
from pathlib import Path
from typing import Callable

# os.link errors that mean "this file system has no hard links"; anything else is a real error.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}
MAX_NAME_BYTES = 255   # one path component, on every common file system


class FileNameError(ValueError):
    """A file name that cannot be used (too long, a NUL byte, a folder outside the allowed one)."""


def check_name(name: str) -> None:
    """Raise FileNameError for a name no file system accepts (NUL, a part over 255 bytes)."""
    if "\x00" in name:
        raise FileNameError("contains a NUL character")
    for part in name.replace("\\", "/").split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise FileNameError(f"has a part longer than {MAX_NAME_BYTES} bytes")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the file itself is flushed already
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _place(tmp: str, final: Path, overwrite: bool) -> None:
    """Give ``tmp`` the name ``final``; ``FileExistsError`` if taken and not ``overwrite``."""
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
        return
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
    # No hard links: reserve the name (fails if taken), then rename over our own reservation.
    fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    os.replace(tmp, final)


def _with_temp(folder: Path, write: Callable[[str], None], place: Callable[[str], Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # A fresh name rather than mkstemp: the writer creates the file, so it gets the user's
    # usual permissions (mkstemp's are owner-only).
    tmp = str(folder / f".accel-{uuid.uuid4().hex}.part")
    try:
        write(tmp)
        _fsync_file(tmp)
        final = place(tmp)
        _fsync_dir(folder)
        return final
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bytes_writer(data: bytes) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    return write


def write_atomic(path: str | Path, write: Callable[[str], None] | bytes, overwrite: bool = False) -> Path:
    """Create ``path`` from ``write(tmp_path)`` (or the given bytes) in one step.

    Raises ``FileExistsError`` when ``path`` exists and ``overwrite`` is false; a failed write
    leaves neither a partial file nor a changed old one.
    """
    path = Path(path).absolute()
    check_name(str(path))
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
    check_name(str(folder / f"{stem}_00000_{ext}"))

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


def write_json(folder: str | Path, stem: str, value) -> Path:
    """``value`` as strict JSON in a new numbered file ``folder/stem_NNNNN_.json``."""
    return write_new(folder, stem, ".json", json_bytes(value))


def json_bytes(value) -> bytes:
    """Strict JSON (no bare NaN or Infinity, which most readers refuse): non-finite numbers become null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(value), indent=1, allow_nan=False, default=str).encode("utf-8")


# ---------------------------------------------------------------- reading user-named files


def inside(root: str | Path, name: str, allowed: list[str | Path] | None = None) -> Path | None:
    """``root/name`` with ``..`` and symbolic links resolved, if it stays inside ``root`` (also
    resolved) or, when given, one of the ``allowed`` folders (a link from one of ComfyUI's folders
    into another); None if it leaves them or the name is unusable. A name that is absolute or
    climbs out is refused before any file system call."""
    try:
        check_name(name)
    except FileNameError:
        return None
    rel = name.replace("\\", "/")
    if not rel or os.path.isabs(rel) or rel[1:2] == ":" or ".." in rel.split("/"):
        return None
    base = os.path.realpath(root)
    full = os.path.realpath(os.path.join(base, rel))
    if full == base:
        return None
    for folder in [base, *(os.path.realpath(a) for a in allowed or ())]:
        if os.path.commonpath([folder, full]) == folder and full != folder:
            return Path(full)
    return None


# ---------------------------------------------------------------- folder listings

_listings: dict[tuple[str, str], tuple[dict[str, float], list[str]]] = {}
MAX_LISTED_FOLDERS = 64   # distinct (folder, suffix) listings kept


def _folder_times(folders: dict[str, float]) -> bool:
    try:
        return all(os.stat(d).st_mtime == t for d, t in folders.items())
    except OSError:
        return False


def listing(folder: str | Path, suffix: str) -> list[str]:
    """Files ending in ``suffix`` under ``folder`` (any depth, symbolic links not followed), as
    sorted paths relative to it with ``/``. Cached: later calls only stat the folders walked."""
    key = (os.path.realpath(folder), suffix)
    cached = _listings.get(key)
    if cached is not None and _folder_times(cached[0]):
        return cached[1]
    folders, found = {}, []
    for here, dirs, names in os.walk(key[0]):
        try:
            folders[here] = os.stat(here).st_mtime
        except OSError:
            continue
        dirs.sort()
        rel = os.path.relpath(here, key[0])
        found += [n if rel == "." else f"{rel}/{n}".replace(os.sep, "/")
                  for n in names if n.endswith(suffix) and os.path.isfile(os.path.join(here, n))
                  and not os.path.islink(os.path.join(here, n))]
    if len(_listings) >= MAX_LISTED_FOLDERS:
        _listings.clear()
    _listings[key] = (folders, sorted(found))
    return _listings[key][1]
