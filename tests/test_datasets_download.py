"""Download machinery against a local HTTP server: resume, retries, checksums, safe extraction."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile

import pytest

from data_builders import FileServer, make_tar, make_zip, sha256
from finetail.datasets.download import (
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    cache_dir,
    cached_file_digest,
    download,
    safe_extract,
    verify,
)

DATA = os.urandom(300_000)


@pytest.fixture
def server():
    with FileServer() as s:
        s.files["/data.bin"] = DATA
        yield s


def test_download_verifies_and_is_idempotent(server, tmp_path):
    dest = tmp_path / "sub" / "data.bin"
    md5 = hashlib.md5(DATA).hexdigest()
    assert download(f"{server.url}/data.bin", dest, sha256=sha256(DATA), md5=md5, size=len(DATA), progress=False) == dest
    assert dest.read_bytes() == DATA
    assert not (tmp_path / "sub" / "data.bin.part").exists()
    assert verify(dest, sha256=sha256(DATA)) and verify(dest, md5=md5) and verify(dest)
    assert not verify(dest, md5="0" * 32) and not verify(tmp_path / "missing")
    hits = server.hits()
    download(f"{server.url}/data.bin", dest, sha256=sha256(DATA), progress=False)
    assert server.hits() == hits  # no network when the file is there and verifies


def test_checksum_mismatch_deletes_part(server, tmp_path):
    dest = tmp_path / "data.bin"
    with pytest.raises(ChecksumError) as info:
        download(f"{server.url}/data.bin", dest, sha256="ab" * 32, progress=False)
    e = info.value
    assert e.expected == "ab" * 32 and e.actual == sha256(DATA)
    assert "data.bin" in str(e) and "ab" * 32 in str(e) and sha256(DATA) in str(e)
    assert not dest.exists() and not (tmp_path / "data.bin.part").exists()
    with pytest.raises(ChecksumError, match="size"):
        download(f"{server.url}/data.bin", dest, size=len(DATA) + 1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_dropped_connection_resumes_with_range(server, tmp_path):
    server.drop_after["/data.bin"] = 100_000
    dest = tmp_path / "data.bin"
    download(f"{server.url}/data.bin", dest, sha256=sha256(DATA), progress=False, backoff=0)
    assert dest.read_bytes() == DATA
    reqs = [h for p, h in server.requests if p == "/data.bin"]
    assert len(reqs) == 2
    assert "Range" not in reqs[0]
    assert reqs[1]["Range"] == "bytes=100000-"


def test_interrupted_part_from_an_earlier_run_is_resumed(server, tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(DATA[:12345])
    download(f"{server.url}/data.bin", dest, sha256=sha256(DATA), progress=False)
    assert dest.read_bytes() == DATA
    assert server.requests[-1][1]["Range"] == "bytes=12345-"


def test_server_ignoring_range_restarts(server, tmp_path):
    server.ignore_range = True
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(b"garbage" * 10)
    download(f"{server.url}/data.bin", dest, sha256=sha256(DATA), progress=False)
    assert dest.read_bytes() == DATA


def test_part_longer_than_file_restarts(server, tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(DATA + b"extra")
    download(f"{server.url}/data.bin", dest, sha256=sha256(DATA), progress=False, backoff=0)
    assert dest.read_bytes() == DATA


def test_5xx_is_retried_4xx_is_not(server, tmp_path):
    server.fail["/data.bin"] = 2
    download(f"{server.url}/data.bin", tmp_path / "a.bin", sha256=sha256(DATA), progress=False, backoff=0)
    assert server.hits("/data.bin") == 3
    server.fail["/data.bin"] = 10
    with pytest.raises(DownloadError, match="3 attempts"):
        download(f"{server.url}/data.bin", tmp_path / "b.bin", retries=2, progress=False, backoff=0)
    n = server.hits()
    with pytest.raises(DownloadError, match="404"):
        download(f"{server.url}/nope.bin", tmp_path / "c.bin", progress=False, backoff=0)
    assert server.hits() == n + 1


def test_connection_refused_is_retried_then_fails(tmp_path):
    with FileServer() as s:
        url = s.url
    with pytest.raises(DownloadError, match="2 attempts"):
        download(f"{url}/x", tmp_path / "x", retries=1, progress=False, backoff=0, timeout=2)
    assert not (tmp_path / "x").exists()


def test_existing_bad_file_is_an_error_not_overwritten(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"something else")
    with pytest.raises(ChecksumError):
        download(f"{server.url}/data.bin", dest, sha256=sha256(DATA), progress=False)
    assert dest.read_bytes() == b"something else" and server.hits() == 0


# ------------------------------------------------------------------------- extraction


def _tar_with(info: tarfile.TarInfo, data: bytes | None = None, before: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, content in (before or {}).items():
            ti = tarfile.TarInfo(name)
            ti.size = len(content)
            tf.addfile(ti, io.BytesIO(content))
        tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"evil") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = target
    return ti


def _dev(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.CHRTYPE
    ti.devmajor, ti.devminor = 1, 3
    return ti


UNSAFE_TARS = {
    "dotdot": (_file("data/../../evil"), b"evil", "'..'"),
    "absolute": (_file("/tmp/finetail-evil-abs"), b"evil", "absolute"),
    "symlink": (_link("data/link", "../../outside"), None, "link"),
    "symlink_abs": (_link("data/link", "/etc/passwd"), None, "link"),
    "hardlink": (_link("data/hard", "/etc/passwd", tarfile.LNKTYPE), None, "link"),
    "device": (_dev("data/null"), None, "device"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_TARS))
def test_unsafe_tar_is_refused_and_nothing_remains(case, tmp_path):
    info, data, why = UNSAFE_TARS[case]
    work = tmp_path / "work"
    work.mkdir()
    archive = work / "a.tar.gz"
    archive.write_bytes(_tar_with(info, data, before={"data/ok.txt": b"fine"}))
    out = work / "sub" / "out"
    with pytest.raises(UnsafeArchiveError, match=why):
        safe_extract(archive, out)
    assert not out.exists()
    assert sorted(p.name for p in (work / "sub").iterdir()) == []  # no temp folder left
    assert not (tmp_path / "evil").exists() and not (tmp_path / "outside").exists()
    assert not os.path.exists("/tmp/finetail-evil-abs")
    assert sorted(p.name for p in work.iterdir()) == ["a.tar.gz", "sub"]  # nothing written beside the archive


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt"])
def test_unsafe_zip_is_refused(name, tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip({"ok.txt": b"fine", name: b"evil"}))
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()


def test_zip_symlink_is_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zi = zipfile.ZipInfo("link")
        zi.external_attr = (0o120777 << 16)
        zf.writestr(zi, "../../outside")
    archive = tmp_path / "a.zip"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_safe_extract_is_idempotent_and_replaces_a_new_version(tmp_path):
    archive = tmp_path / "a.tgz"
    archive.write_bytes(make_tar({"top/x.txt": b"1", "top/d/y.txt": b"2"}))
    out = tmp_path / "out"
    files = safe_extract(archive, out)
    assert sorted(p.relative_to(out).as_posix() for p in files) == ["top/d/y.txt", "top/x.txt"]
    assert (out / "top" / "x.txt").read_bytes() == b"1" and (out / ".extracted").exists()
    (out / "top" / "x.txt").write_bytes(b"touched")
    assert safe_extract(archive, out) == files
    assert (out / "top" / "x.txt").read_bytes() == b"touched"  # marker matched: not re-extracted
    archive.write_bytes(make_tar({"top/z.txt": b"3"}))
    safe_extract(archive, out)
    assert not (out / "top" / "x.txt").exists() and (out / "top" / "z.txt").read_bytes() == b"3"
    plain = tmp_path / "p.tar"
    plain.write_bytes(make_tar({"q.txt": b"4"}, compress=""))
    assert [p.name for p in safe_extract(plain, tmp_path / "pout")] == ["q.txt"]


def test_safe_extract_refuses_a_foreign_folder_and_non_archives(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip({"x.txt": b"1"}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").exists()
    (tmp_path / "f.mat").write_bytes(b"")
    with pytest.raises(ValueError, match="not a tar or zip"):
        safe_extract(tmp_path / "f.mat", tmp_path / "o2")


def test_the_digest_cache_lives_in_the_user_cache_never_beside_the_file(tmp_path, monkeypatch):
    """Issue 26: the cache was a hidden ``.<name>.digests.json`` beside the user's archive."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache" / "finetail"
    data = tmp_path / "data"
    data.mkdir()
    archive = data / "a.bin"
    archive.write_bytes(DATA)
    assert cached_file_digest(archive) == hashlib.sha256(DATA).hexdigest()
    assert cached_file_digest(archive, "md5") == hashlib.md5(DATA).hexdigest()
    assert [p.name for p in data.iterdir()] == ["a.bin"]
    [entry] = (tmp_path / "cache" / "finetail" / "digests").iterdir()
    # The cache is read: a digest planted under the same key is what comes back ...
    record = json.loads(entry.read_text())
    assert record["path"] == str(archive.resolve())
    entry.write_text(json.dumps(record | {"sha256": "0" * 64}))
    assert cached_file_digest(archive) == "0" * 64
    # ... until the file changes (here: same size, new bytes), when it is hashed again.
    archive.write_bytes(DATA[::-1])
    assert cached_file_digest(archive) == hashlib.sha256(DATA[::-1]).hexdigest()
    # Without XDG_CACHE_HOME: ~/.cache/finetail.
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "finetail"
