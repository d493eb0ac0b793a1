"""File writing and hashing shared by every stage (standard library only, no torch).

- :func:`atomic_write`: readers see the old file or the whole new one, never a partial
  write. Every finished file finetail writes goes through it.
- :func:`file_digest` (and :func:`file_sha256`, its sha256 shorthand): the hex digest of a
  file's bytes, streamed in 1 MiB blocks.
- :func:`write_json`: JSON through :func:`atomic_write`; :func:`read_json`, its reader.
- :func:`log`: the one timestamped stderr line every command reports with.
- :func:`disk_full_error`: a write's exception as a one-line :class:`~finetail.errors.DiskFull`
  when the device was full.

Example
-------
>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "a" / "hello.txt"
>>> atomic_write(p, lambda tmp: tmp.write_text("hello"))
>>> file_sha256(p)[:12], file_digest(p, "md5")[:12]
('2cf24dba5fb0', '5d41402abc4b')
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_write", "disk_full_error", "disk_full_is_one_line", "file_digest", "file_sha256", "log", "read_json", "write_json"]

_CHUNK = 1 << 20
ALGORITHMS = ("sha256", "md5")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which is not thread-safe.
_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, then ``os.replace`` it into place.

    The temp file has a unique name in ``path``'s folder (so the replace is a rename on one
    file system, and two writers of one path never share a temp file), the mode a plain
    ``open(path, "w")`` would give (``0o666`` less the umask, not ``mkstemp``'s ``0o600``),
    and is removed if ``write`` or the replace fails. ``path``'s folder is created.

    Parameters
    ----------
    path : str or Path
        The final file.
    write : callable
        Called once with the temp file's ``Path`` (the file exists, empty); writes the whole
        content to it by name (``tmp.write_text``, ``df.to_parquet(tmp)``, ``torch.save(obj,
        tmp)``, ``open(tmp, "wb")``). The temp name ends in ``.tmp``: a writer that appends
        its own suffix to a bare name (``np.save("x")`` writes ``x.npy``) must be given an
        open file instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _FILE_MODE)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write() names no file: name the one being written
        raise


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Lower-case hex digest of a file's bytes.

    Parameters
    ----------
    path : str or Path
        The file.
    algorithm : {"sha256", "md5"}
        Digest algorithm.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}; got {algorithm!r}")
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes: ``file_digest(path, "sha256")``."""
    return file_digest(path, "sha256")


def write_json(obj: object, path: str | Path) -> None:
    """``obj`` as indented JSON (a trailing newline), written atomically (:func:`atomic_write`)."""
    import json

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``; ``ValueError`` naming the file when it is not valid JSON
    or not an object."""
    import json

    try:
        obj = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def log(msg: str) -> None:
    """One timestamped line on stderr, flushed: how every ``finetail`` command reports."""
    import sys
    import time

    print(f"[finetail {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_SQLITE_FULL = "database or disk is full"  # SQLITE_FULL as sqlite3, SQLAlchemy and MLflow word it


def disk_full_error(exc: BaseException, folders=()):
    """``exc`` as a one-line :class:`~finetail.errors.DiskFull` when it, or an exception it was
    raised from or while handling, says the device was full: an ``OSError`` with ``ENOSPC`` or
    ``EDQUOT``, or SQLite's "database or disk is full". None otherwise.

    The folder named is the parent of the file the ``OSError`` names, else the one of
    ``folders`` (the places the command writes to) whose device has the least room left.
    """
    from .errors import DiskFull

    seen: set[int] = set()
    found = None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull):
            return exc
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            found = exc
            break
        if _SQLITE_FULL in str(exc):
            found = exc
            break
        exc = exc.__cause__ or exc.__context__
    if found is None:
        return None
    if isinstance(found, OSError):
        detail = os.strerror(found.errno)
        folder = Path(os.fsdecode(found.filename)).parent if found.filename else _least_room(folders)
    else:
        detail, folder = _SQLITE_FULL, _least_room(folders)
    return DiskFull(None if folder is None else str(folder), detail)


@contextlib.contextmanager
def disk_full_is_one_line(folders=()) -> Iterator[None]:
    """Raise a full device met in the block as :class:`~finetail.errors.DiskFull` (a user
    error: one line), naming the folder as :func:`disk_full_error` does; other errors pass."""
    try:
        yield
    except Exception as e:
        full = disk_full_error(e, folders)
        if full is None or full is e:
            raise
        raise full from e


def _least_room(folders) -> Path | None:
    """Of ``folders`` (each taken as its nearest existing ancestor), the one whose device has
    the fewest bytes free; None for no folders."""
    best, least = None, None
    for folder in folders:
        folder = Path(folder).absolute()
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            st = os.statvfs(probe)
        except OSError:
            continue
        room = st.f_bavail * st.f_frsize
        if least is None or room < least:
            best, least = folder, room
    return best
