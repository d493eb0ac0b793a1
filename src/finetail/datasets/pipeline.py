"""``prepare``: download (or check manual placement) -> verify -> extract -> parse -> manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from ..manifest import class_table, write_manifest
from .download import ChecksumError, ManualDownloadRequired, download, file_digest, safe_extract, verify
from .parsers import parse_imagefolder
from .registry import DatasetEntry, get, rebase_url
from .store import to_array_store

__all__ = ["fetch", "prepare", "prepare_imagefolder"]

_STAMP = "source.json"


def _manual_message(entry: DatasetEntry, raw_dir: Path, missing: list) -> str:
    lines = [f"dataset {entry.name!r} must be downloaded by hand ({entry.license})"]
    for f in missing:
        lines.append(f"  - get {f.filename} from {f.url}")
        lines.append(f"    and put it at {raw_dir / f.filename}  (resources/{entry.name}/{f.filename})")
    lines.append("then run the same command again; the file is verified before use.")
    return "\n".join(lines)


def fetch(
    entry: str | DatasetEntry, resources_dir: str | Path, base_url: str | None = None, progress: bool = True, backoff: float = 1.0
) -> Path:
    """Download (or check) and verify every file of a dataset, then extract its archives.

    Parameters
    ----------
    entry : str or DatasetEntry
        Registry name, or an entry (e.g. one with pinned checksums).
    resources_dir : str or Path
        Downloads go to ``resources_dir/<name>/``; archives are extracted next to them.
    base_url : str, optional
        Replace the scheme and host of every URL (a mirror, or a test server).
    progress : bool
        Progress bars on a terminal.
    backoff : float
        Base of the retry back-off, seconds.

    Returns
    -------
    Path
        ``resources_dir/<name>``, the folder the parser reads.

    Raises
    ------
    ManualDownloadRequired
        A manual file is missing (the message says where to get it and where to put it).
    ChecksumError
        A file does not match its checksum.
    """
    entry = get(entry) if isinstance(entry, str) else entry
    raw_dir = Path(resources_dir) / entry.name
    if entry.ready and all((raw_dir / r).exists() for r in entry.ready):
        return raw_dir  # an extracted copy placed by hand
    raw_dir.mkdir(parents=True, exist_ok=True)
    if entry.manual:
        missing = [f for f in entry.files if not (raw_dir / f.filename).is_file()]
        if missing:
            raise ManualDownloadRequired(_manual_message(entry, raw_dir, missing))
        for f in entry.files:
            path = raw_dir / f.filename
            if not verify(path, f.sha256, f.md5, f.size):
                algorithm, expected = ("sha256", f.sha256) if f.sha256 else ("md5", f.md5) if f.md5 else ("size", str(f.size))
                actual = file_digest(path, algorithm) if algorithm != "size" else str(path.stat().st_size)
                raise ChecksumError(path, algorithm, str(expected), actual)
    else:
        for f in entry.files:
            download(rebase_url(f.url, base_url), raw_dir / f.filename, sha256=f.sha256, md5=f.md5, size=f.size, progress=progress, backoff=backoff)
    for f in entry.files:
        if f.archive is not None:
            safe_extract(raw_dir / f.filename, raw_dir / f.folder)
    if entry.post_extract is not None:
        entry.post_extract(raw_dir)
    return raw_dir


def _stamp(entry: DatasetEntry, raw_dir: Path) -> dict:
    files = {}
    for f in entry.files:
        p = raw_dir / f.filename
        files[f.filename] = file_digest(p, "sha256") if p.is_file() else None
    return {"dataset": entry.name, "kind": entry.kind, "splits": entry.splits, "homepage": entry.homepage, "license": entry.license, "files": files}


def _write_outputs(df: pd.DataFrame, raw_dir: Path, out_dir: Path, kind: str, stamp: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.parquet"
    if kind == "array":
        written = to_array_store(df, out_dir, root=raw_dir)
    else:
        written = df.copy()
        written["path"] = [os.path.relpath(raw_dir / p, out_dir) for p in written["path"]]
        written = written.drop(columns=[c for c in ("row",) if c in written.columns])
        write_manifest(written, manifest)
    class_table(written).to_csv(out_dir / "classes.csv", index=False)
    (out_dir / _STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True))
    return manifest


def prepare(
    name: str | DatasetEntry,
    resources_dir: str | Path,
    out_dir: str | Path,
    base_url: str | None = None,
    progress: bool = True,
    backoff: float = 1.0,
) -> Path:
    """Turn a registered dataset into ``out_dir/manifest.parquet``.

    Steps: download (or check the manual placement) -> verify -> safe extract -> parse the
    official splits -> for ``kind == "array"``, decode into ``out_dir/images.npy``. Paths in
    the manifest are relative to ``out_dir``. Beside it: ``classes.csv`` (per-class counts)
    and ``source.json`` (dataset, splits note, sha256 of each input file). A second call
    whose inputs are unchanged returns at once, without network access.

    Parameters
    ----------
    name : str or DatasetEntry
        Registry name (see :func:`finetail.datasets.registry.names`) or an entry.
    resources_dir : str or Path
        Where raw downloads live (``resources_dir/<name>/``).
    out_dir : str or Path
        Where the manifest (and array store) go.
    base_url : str, optional
        Replace the host of every URL (a mirror; the tests' local server).
    progress : bool
        Progress bars on a terminal.
    backoff : float
        Base of the retry back-off, seconds.

    Returns
    -------
    Path
        ``out_dir/manifest.parquet``.

    Raises
    ------
    ValueError
        Unknown dataset name.
    ManualDownloadRequired
        (a ``FileNotFoundError``) a manual file is missing.
    ChecksumError
        A file fails verification; nothing is written to ``out_dir``.
    """
    entry = get(name) if isinstance(name, str) else name
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.parquet"
    raw_dir = Path(resources_dir) / entry.name
    if manifest.exists() and (out_dir / _STAMP).exists():
        try:
            old = json.loads((out_dir / _STAMP).read_text())
        except (OSError, ValueError):
            old = None
        ready = bool(entry.ready) and all((raw_dir / r).exists() for r in entry.ready)
        files_ok = all(verify(raw_dir / f.filename, f.sha256, f.md5, f.size) for f in entry.files) and all(
            (raw_dir / f.folder / ".extracted").exists() for f in entry.files if f.archive is not None
        )
        if old is not None and (ready or files_ok) and old == _stamp(entry, raw_dir):
            return manifest
    raw_dir = fetch(entry, resources_dir, base_url=base_url, progress=progress, backoff=backoff)
    df = entry.parse(raw_dir)
    return _write_outputs(df, raw_dir, out_dir, entry.kind, _stamp(entry, raw_dir))


def prepare_imagefolder(source: str | Path, out_dir: str | Path, kind: str = "files") -> Path:
    """Turn a user's own images into ``out_dir/manifest.parquet``.

    Parameters
    ----------
    source : str or Path
        A ``train/<class>/*`` + ``test/<class>/*`` tree, a CSV manifest (``path``,
        ``label`` and/or ``class_name``, ``split``), or a ``.tar``/``.tar.gz``/``.tgz``/
        ``.zip`` of such a tree (extracted safely into ``out_dir/raw/``).
    out_dir : str or Path
        Output folder.
    kind : {"files", "array"}
        ``"array"`` decodes every image into ``out_dir/images.npy`` (all images one size).

    Returns
    -------
    Path
        ``out_dir/manifest.parquet``.
    """
    if kind not in ("files", "array"):
        raise ValueError(f"kind must be 'files' or 'array', got {kind!r}")
    source, out_dir = Path(source), Path(out_dir)
    from .download import archive_kind

    if source.is_file() and archive_kind(source) is not None:
        root = out_dir / "raw"
        safe_extract(source, root)
        tops = [p for p in root.iterdir() if p.is_dir()]
        if not any(p.name in ("train", "test") for p in tops) and len(tops) == 1:
            root = tops[0]  # one folder wrapping train/ and test/
        source = root
    df = parse_imagefolder(source)
    root = source.parent if source.is_file() else source
    stamp = {"dataset": "imagefolder", "source": str(source), "kind": kind}
    return _write_outputs(df, root, out_dir, kind, stamp)
