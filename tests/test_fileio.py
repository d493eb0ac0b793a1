"""finetail.fileio: the one atomic writer and the one file hash."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import sqlite3
import stat

import pytest

from finetail import manifest
from finetail.errors import DiskFull, UserError
from finetail.fileio import atomic_write, disk_full_error, disk_full_is_one_line, file_digest, file_sha256, write_json

from helpers import fill, tmpfs


def test_atomic_write_creates_folder_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    atomic_write(path, lambda tmp: tmp.write_text("one"))
    assert path.read_text() == "one"
    atomic_write(path, lambda tmp: tmp.write_text("two"))
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


def test_atomic_write_temp_is_unique_and_beside_the_target(tmp_path):
    seen = []
    for _ in range(2):
        atomic_write(tmp_path / "x.bin", lambda tmp: (seen.append(tmp), tmp.write_bytes(b"x")))
    assert seen[0] != seen[1]
    assert all(t.parent == tmp_path and t.name.startswith(".x.bin.") and t.name.endswith(".tmp") for t in seen)


def test_atomic_write_failure_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, boom)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_write_mode_follows_the_umask_not_mkstemp(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("p")
    atomic_write(tmp_path / "atomic.txt", lambda tmp: tmp.write_text("a"))
    assert stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


@pytest.mark.parametrize("algorithm", ["sha256", "md5"])
def test_file_digest(tmp_path, algorithm):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read block
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert file_digest(path, algorithm) == hashlib.new(algorithm, data).hexdigest()
    assert file_digest(str(path), algorithm) == hashlib.new(algorithm, data).hexdigest()


def test_file_sha256_is_file_digest_sha256(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("hello")
    assert file_sha256(path) == file_digest(path) == hashlib.sha256(b"hello").hexdigest()


def test_file_digest_refuses_other_algorithms(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="sha256"):
        file_digest(tmp_path / "f", "sha1")


def test_one_atomic_writer_and_one_file_hash():
    """No module but fileio defines or re-exports a writer or a hash of its own."""
    import ast

    from conftest import ROOT

    found = []
    for f in sorted((ROOT / "src" / "finetail").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in ("atomic_write", "file_sha256", "file_digest",
                                                                  "write_json"):
                found.append(f"{f.name}:{node.name}")
    assert found == ["fileio.py:atomic_write", "fileio.py:file_digest", "fileio.py:file_sha256",
                     "fileio.py:write_json"]
    assert "atomic_write" not in manifest.__all__ and "file_sha256" not in manifest.__all__


def test_a_full_device_is_one_line_naming_the_folder(tmp_path):
    """A write on a full device (a real tmpfs) names the file it wrote; disk_full_error turns it,
    or SQLite's "database or disk is full" anywhere in an exception's chain, into one line."""
    with tmpfs(tmp_path / "fs", 64) as fs:
        fill(fs)
        with pytest.raises(OSError) as e:
            write_json({"a": "x" * 10_000}, fs / "sub" / "r.json")
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(fs / "sub" / "r.json")
        assert not [p for p in (fs / "sub").iterdir()]  # no temp file left
        full = disk_full_error(e.value)
        assert isinstance(full, UserError)
        assert str(full) == (f"the device holding {fs / 'sub'} is full (No space left on device); "
                             "nothing was lost: rerun when there is room")
        assert str(pickle.loads(pickle.dumps(full))) == str(full)  # the tracking process sends it

        # SQLite's wording, wrapped (as SQLAlchemy and MLflow do): the folder with the least room
        try:
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError as inner:
                raise RuntimeError("(raised as a result of Query-invoked autoflush)") from inner
        except RuntimeError as wrapped:
            full = disk_full_error(wrapped, [tmp_path, fs / "study" / "not-yet"])
        assert str(full).startswith(f"the device holding {fs / 'study' / 'not-yet'} is full (database or disk is full)")

        # a write that names no file, and no folder to suspect: still one line
        with pytest.raises(DiskFull, match=r"^a device finetail writes to is full \(No space left on device\)"), \
                disk_full_is_one_line():
            (fs / "big").write_bytes(b"x" * 10_000)
        with pytest.raises(DiskFull, match=f"^the device holding {fs} is full"), disk_full_is_one_line([fs, tmp_path]):
            (fs / "big").write_bytes(b"x" * 10_000)
    assert disk_full_error(ValueError("database is locked")) is None
    with pytest.raises(ValueError), disk_full_is_one_line():
        raise ValueError("not a full device")
