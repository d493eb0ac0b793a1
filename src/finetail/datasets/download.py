"""Download machinery: resumable HTTP downloads, checksums and safe archive extraction.

Everything here uses the standard library only (``urllib``, ``tarfile``, ``zipfile``) plus
``tqdm`` for progress bars. The guarantees that later stages rely on:

- a file at ``dest`` is complete and verified (a download in progress lives in
  ``dest + ".part"``; a checksum mismatch deletes the ``.part``);
- an extracted folder is complete (extraction happens in a temporary folder next to the
  target and is renamed into place only when every member was written);
- nothing is ever written outside the target folder (absolute paths, ``..`` components,
  links and device files are refused).

Example
-------
>>> from finetail.datasets.download import download, safe_extract  # doctest: +SKIP
>>> tgz = download("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
...                "resources/cifar10/cifar-10-python.tar.gz",
...                md5="c58f30108f718f92721af3b95e74349a")              # doctest: +SKIP
>>> safe_extract(tgz, "resources/cifar10/cifar-10-python")            # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import lzma
import os
import shutil
import socket
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from ..errors import UserError
from ..fileio import atomic_write, file_digest

__all__ = [
    "ArchiveError",
    "ChecksumError",
    "ForeignFolderError",
    "DownloadError",
    "ManualDownloadRequired",
    "UnsafeArchiveError",
    "archive_kind",
    "cache_dir",
    "cached_file_digest",
    "download",
    "safe_extract",
    "verify",
]

_CHUNK = 1 << 20
# What tarfile / zipfile and their decompressors raise on a truncated or corrupt archive.
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)
_MARKER = ".extracted"
_USER_AGENT = "finetail-datasets/0.1 (urllib)"


class ChecksumError(UserError):
    """A file's digest (or size) differs from the expected one.

    Attributes
    ----------
    path : Path
        The file that failed (already deleted when it was a download's ``.part``).
    algorithm, expected, actual : str
        The digest algorithm and both digests (or sizes, with ``algorithm="size"``).
    """

    def __init__(self, path: Path, algorithm: str, expected: str, actual: str) -> None:
        self.path, self.algorithm, self.expected, self.actual = Path(path), algorithm, expected, actual
        super().__init__(f"{algorithm} mismatch for {path}: expected {expected}, got {actual}")


class DownloadError(UserError):
    """A download failed for good (a 4xx answer, or every retry used up)."""


class UnsafeArchiveError(UserError):
    """An archive member would escape the output folder, or is a link or a device file."""


class ArchiveError(UserError):
    """An archive that cannot be read to the end (truncated or corrupt)."""


class ForeignFolderError(UserError, FileExistsError):
    """The extraction target exists but was not made by :func:`safe_extract`."""


class ManualDownloadRequired(UserError, FileNotFoundError):
    """A file must be fetched by hand (the dataset sits behind a login or a form).

    The message names each missing file, the official page to get it from and the exact
    place to put it; after that, ``prepare`` verifies it like any download.
    """


# ----------------------------------------------------------------------------- digests


def cache_dir() -> Path:
    """finetail's cache folder: ``$XDG_CACHE_HOME/finetail`` (default ``~/.cache/finetail``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetail"


def _cache_path(path: Path) -> Path:
    """The digest cache of ``path`` (made absolute, links resolved): one JSON file under
    :func:`cache_dir` named by the sha256 of that path, never a file beside the data."""
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()
    return cache_dir() / "digests" / f"{name}.json"


def cached_file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """:func:`finetail.fileio.file_digest`, cached by (device, inode, size, mtime, ctime).

    Hashing a 150 GB archive takes minutes, so the digest is remembered in finetail's cache
    folder (:func:`cache_dir`; one file per path, named by the sha256 of the resolved path)
    and recomputed only when the file at that path is another file or changed. Nothing is
    written beside the file: data folders may be shared or read-only. A cache that cannot be
    written (a read-only home) only costs the next call a rehash.

    Parameters
    ----------
    path : str or Path
        The file.
    algorithm : {"sha256", "md5"}
        Digest algorithm.

    Returns
    -------
    str
        Lower-case hex digest.
    """
    path = Path(path)
    st = path.stat()
    key = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    cache = _cache_path(path)
    data: dict = {}
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict) or data.get("key") != key or data.get("path") != str(path.resolve()):
        data = {}
    if algorithm not in data:
        data[algorithm] = file_digest(path, algorithm)
        data.update(path=str(path.resolve()), key=key)
        text = json.dumps(data)
        try:
            atomic_write(cache, lambda tmp: tmp.write_text(text))
        except OSError:
            pass  # a cache folder that cannot be written: the digest is still correct, just not cached
    return data[algorithm]


def _check(path: Path, sha256: str | None, md5: str | None, size: int | None) -> None:
    """Raise ChecksumError unless ``path`` matches every given expectation."""
    if size is not None:
        actual = path.stat().st_size
        if actual != size:
            raise ChecksumError(path, "size", str(size), str(actual))
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is not None:
            actual = file_digest(path, algorithm) if path.name.endswith(".part") else cached_file_digest(path, algorithm)
            if actual.lower() != expected.lower():
                raise ChecksumError(path, algorithm, expected.lower(), actual)


def verify(path: str | Path, sha256: str | None = None, md5: str | None = None, size: int | None = None) -> bool:
    """Whether a file exists and matches the given digests (and size).

    With no digest and no size, verification is existence only.

    Parameters
    ----------
    path : str or Path
        The file.
    sha256, md5 : str, optional
        Expected hex digests.
    size : int, optional
        Expected size in bytes.

    Returns
    -------
    bool
    """
    path = Path(path)
    if not path.is_file():
        return False
    try:
        _check(path, sha256, md5, size)
    except ChecksumError:
        return False
    return True


# ---------------------------------------------------------------------------- download


class _Retryable(Exception):
    pass


def _fetch_once(url: str, part: Path, progress: bool, timeout: float) -> None:
    """One attempt: resume ``part`` if it exists; raise _Retryable on transient failure."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            # Range not satisfiable: the .part is already full length (or longer). Start over
            # rather than guess; the checksum decides either way.
            part.unlink()
            raise _Retryable(f"HTTP 416 for a {offset}-byte resume; restarting") from e
        if e.code >= 500 or e.code == 429:
            raise _Retryable(f"HTTP {e.code}") from e
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, ConnectionError, socket.timeout, http.client.HTTPException) as e:
        raise _Retryable(str(e)) from e
    with resp:
        status = getattr(resp, "status", 200)
        length = resp.headers.get("Content-Length")
        if offset and status == 206:
            mode, start = "ab", offset
        else:
            mode, start = "wb", 0  # no Range asked, or the server ignored it: restart
        total = start + int(length) if length is not None else None
        written = start
        bar = tqdm(
            total=total,
            initial=start,
            unit="B",
            unit_scale=True,
            desc=part.name[: -len(".part")],
            disable=not progress or not sys.stderr.isatty(),
        )
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        block = resp.read(_CHUNK)
                    except (http.client.IncompleteRead, ConnectionError, socket.timeout, OSError) as e:
                        raise _Retryable(f"connection lost after {written} bytes: {e}") from e
                    if not block:
                        break
                    f.write(block)
                    written += len(block)
                    bar.update(len(block))
        finally:
            bar.close()
    if total is not None and written != total:
        raise _Retryable(f"connection closed after {written} of {total} bytes")


def download(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``: resumable, retried, verified, atomic.

    If ``dest`` already exists and verifies, return at once (no network). Otherwise bytes go
    to ``dest + ".part"``; an existing ``.part`` is resumed with ``Range: bytes=N-`` (a server
    that ignores Range and answers 200 makes the download restart). Connection errors, short
    reads, 5xx and 429 answers are retried up to ``retries`` times, sleeping
    ``backoff * 2**k`` seconds before retry k; the ``.part`` is kept between attempts. When
    complete, the ``.part`` is checked against ``size``, ``sha256`` and ``md5`` and renamed
    to ``dest``.

    Parameters
    ----------
    url : str
        HTTP(S) URL.
    dest : str or Path
        Final path of the file.
    sha256, md5 : str, optional
        Expected hex digests (either, both or neither).
    size : int, optional
        Expected size in bytes.
    retries : int
        Retries after the first attempt.
    backoff : float
        Base of the exponential back-off, seconds.
    progress : bool
        Show a tqdm bar (only when stderr is a terminal).
    timeout : float
        Socket timeout of each attempt, seconds.

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    ChecksumError
        The downloaded bytes do not match; the ``.part`` has been deleted.
    DownloadError
        A 4xx answer, or all retries failed (the ``.part`` is kept for a later resume).
    """
    dest = Path(dest)
    if dest.exists():
        _check(dest, sha256, md5, size)  # a bad existing file is an error, never overwritten silently
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _fetch_once(url, part, progress, timeout)
        except _Retryable as e:
            last = e
            continue
        break
    else:
        raise DownloadError(f"{url}: failed after {retries + 1} attempts: {last}") from last
    try:
        _check(part, sha256, md5, size)
    except ChecksumError as e:
        part.unlink(missing_ok=True)
        raise ChecksumError(dest, e.algorithm, e.expected, e.actual) from None
    # The .part is not an atomic_write temp file: its fixed name is what lets a later
    # attempt (or a later run) resume it with Range. Verified, it is renamed the same way.
    os.replace(part, dest)
    return dest


# ---------------------------------------------------------------------------- extract


def archive_kind(path: str | Path) -> str | None:
    """``"tar"`` (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz), ``"zip"``, or None for a plain file."""
    name = Path(path).name.lower()
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz")):
        return "tar"
    if name.endswith(".zip"):
        return "zip"
    return None


def _safe_member(name: str, archive: Path) -> PurePosixPath:
    """The member's relative path, or UnsafeArchiveError."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path")
    rel = PurePosixPath(name.replace("\\", "/"))
    if ".." in rel.parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} escapes the output folder ('..')")
    return rel


def _write_stream(src, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def _extract_tar(archive: Path, tmp: Path) -> list[Path]:
    out: list[Path] = []
    with tarfile.open(archive, "r:*") as tf:
        for m in tf:  # streaming: a refused member stops everything at once
            rel = _safe_member(m.name, archive)
            if m.issym() or m.islnk():
                raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a link (to {m.linkname!r}); links are refused")
            if m.isdir():
                (tmp / rel).mkdir(parents=True, exist_ok=True)
                continue
            if not m.isfile():
                raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device or special file")
            src = tf.extractfile(m)
            if src is None:
                raise UnsafeArchiveError(f"{archive}: member {m.name!r} has no data")
            with src:
                _write_stream(src, tmp / rel)
            out.append(rel)
    return out


def _extract_zip(archive: Path, tmp: Path) -> list[Path]:
    out: list[Path] = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            rel = _safe_member(info.filename, archive)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symlink; links are refused")
            if info.is_dir():
                (tmp / rel).mkdir(parents=True, exist_ok=True)
                continue
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: made on a system without Unix modes
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a device or special file")
            with zf.open(info) as src:
                _write_stream(src, tmp / rel)
            out.append(rel)
    return out


def safe_extract(archive: str | Path, out_dir: str | Path) -> list[Path]:
    """Extract a tar or zip archive into ``out_dir``, refusing anything unsafe.

    Members are written into a temporary folder next to ``out_dir``, which is renamed to
    ``out_dir`` only when all members were written. A member with an absolute path, a ``..``
    component, a symbolic or hard link, or a device/special file raises
    :class:`UnsafeArchiveError`; the partial output is removed, so nothing remains. A marker
    ``out_dir/.extracted`` records the archive's sha256 and members: a second call with the
    same archive returns at once; a different archive replaces the folder.

    Parameters
    ----------
    archive : str or Path
        A ``.tar``, ``.tar.gz``/``.tgz`` (or bz2/xz) or ``.zip`` file.
    out_dir : str or Path
        The folder to create.

    Returns
    -------
    list of Path
        The extracted regular files, as paths under ``out_dir``.

    Raises
    ------
    UnsafeArchiveError
        A refused member.
    ArchiveError
        The archive is truncated or corrupt.
    ForeignFolderError
        (a ``FileExistsError``) ``out_dir`` exists but was not made by this function.
    ValueError
        ``archive`` is neither tar nor zip.
    """
    archive, out_dir = Path(archive), Path(out_dir)
    kind = archive_kind(archive)
    if kind is None:
        raise ValueError(f"{archive}: not a tar or zip archive")
    digest = cached_file_digest(archive, "sha256")
    marker = out_dir / _MARKER
    if marker.exists():
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("sha256") == digest:
            return [out_dir / m for m in info.get("members", [])]
    elif out_dir.exists():
        raise ForeignFolderError(f"{out_dir} exists and was not extracted by finetail; move it away or delete it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.extracting-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        try:
            members = _extract_tar(archive, tmp) if kind == "tar" else _extract_zip(archive, tmp)
        except _ARCHIVE_ERRORS as e:
            raise ArchiveError(f"{archive}: cannot be extracted, truncated or corrupt ({type(e).__name__}: {e}); "
                               "delete it and get it again") from e
        (tmp / _MARKER).write_text(json.dumps({"archive": archive.name, "sha256": digest, "members": [str(m) for m in members]}))
        if out_dir.exists():  # ours, from another archive version
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / m for m in members]
