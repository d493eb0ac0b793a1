"""``prepare``: download (or check manual placement) -> verify -> extract -> parse -> manifest."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pandas as pd

from ..manifest import class_table, write_manifest
from .download import ChecksumError, ManualDownloadRequired, cached_file_digest, download, safe_extract, verify
from .parsers import parse_imagefolder
from .registry import DatasetEntry, get, rebase_url
from .store import check_image_files, check_on_bad_image, to_array_store

__all__ = ["fetch", "prepare", "prepare_from_spec", "prepare_imagefolder"]

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
                actual = cached_file_digest(path, algorithm) if algorithm != "size" else str(path.stat().st_size)
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


def _stamp(entry: DatasetEntry, raw_dir: Path, on_bad_image: str) -> dict:
    files = {}
    for f in entry.files:
        p = raw_dir / f.filename
        files[f.filename] = cached_file_digest(p, "sha256") if p.is_file() else None
    return {"dataset": entry.name, "kind": entry.kind, "splits": entry.splits, "homepage": entry.homepage,
            "license": entry.license, "files": files, "on_bad_image": on_bad_image}


def _names(names, limit: int = 10) -> str:
    names = [str(n) for n in names]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _warn_about_classes(parsed: pd.DataFrame, written: pd.DataFrame) -> None:
    """Warn about classes that lost every image to on_bad_image: skip, and classes with test
    images but no training image (their test images can only count as errors)."""
    lost = sorted(set(parsed["class_name"]) - set(written["class_name"]))
    if lost:
        warnings.warn(f"{len(lost)} classes have no readable image left: {_names(lost)}", UserWarning, stacklevel=4)
    counts = class_table(written)
    test_only = counts[(counts["train_count"] == 0) & (counts["test_count"] > 0)]
    if len(test_only):
        warnings.warn(
            f"{len(test_only)} of {len(counts)} classes have test images but no training images "
            f"(a model cannot learn them): {_names(test_only['class_name'])}",
            UserWarning,
            stacklevel=4,
        )


def _write_outputs(
    df: pd.DataFrame, raw_dir: Path, out_dir: Path, kind: str, stamp: dict, on_bad_image: str, progress: bool
) -> Path:
    """Check and decode every image once (array store, or file manifest with each file's
    sha256), then write the manifest, classes.csv and source.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.parquet"
    if kind == "array":
        written = to_array_store(df, out_dir, root=raw_dir, on_bad_image=on_bad_image, progress=progress)
    else:
        written = check_image_files(df, raw_dir, on_bad_image=on_bad_image, progress=progress)
        written["path"] = [os.path.relpath(raw_dir / p, out_dir) for p in written["path"]]
        written = written.drop(columns=[c for c in ("row",) if c in written.columns])
        write_manifest(written, manifest)
    _warn_about_classes(df, written)
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
    on_bad_image: str = "error",
) -> Path:
    """Turn a registered dataset into ``out_dir/manifest.parquet``.

    Steps: download (or check the manual placement) -> verify -> safe extract -> parse the
    official splits -> decode every image once: for ``kind == "array"`` into
    ``out_dir/images.npy``, for ``kind == "files"`` as a check, recording each file's sha256
    in the manifest's ``sha256`` column. Paths in the manifest are relative to ``out_dir``.
    Beside it: ``classes.csv`` (per-class counts) and ``source.json`` (dataset, splits note,
    sha256 of each input file). A second call whose inputs are unchanged returns at once,
    without network access. Classes with test images but no training image are warned about.

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
    on_bad_image : {"error", "skip"}
        An empty, truncated, corrupt or non-image file fails the preparation with a
        :class:`~finetail.datasets.store.BadImageError` naming it (``"error"``), or its row
        is dropped with a warning naming it, and a count at the end (``"skip"``).

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
    BadImageError
        An image cannot be read (with ``on_bad_image="error"``); no manifest is written.
    """
    check_on_bad_image(on_bad_image)
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
        if old is not None and (ready or files_ok) and old == _stamp(entry, raw_dir, on_bad_image):
            return manifest
    raw_dir = fetch(entry, resources_dir, base_url=base_url, progress=progress, backoff=backoff)
    df = entry.parse(raw_dir)
    return _write_outputs(df, raw_dir, out_dir, entry.kind, _stamp(entry, raw_dir, on_bad_image), on_bad_image, progress)


def prepare_imagefolder(
    source: str | Path, out_dir: str | Path, kind: str = "files", on_bad_image: str = "error", progress: bool = True
) -> Path:
    """Turn a user's own images into ``out_dir/manifest.parquet``.

    Every image is decoded once (into the array store, or as a check that records each
    file's sha256 in the manifest's ``sha256`` column), as in :func:`prepare`.

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
    on_bad_image : {"error", "skip"}
        What to do with a file that cannot be read (see :func:`prepare`).
    progress : bool
        A progress bar on a terminal.

    Returns
    -------
    Path
        ``out_dir/manifest.parquet``.

    Raises
    ------
    UserError
        A CSV path that leaves the CSV's folder (``..``); an unsafe archive member.
    BadImageError
        An image cannot be read (with ``on_bad_image="error"``).
    """
    if kind not in ("files", "array"):
        raise ValueError(f"kind must be 'files' or 'array', got {kind!r}")
    check_on_bad_image(on_bad_image)
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
    stamp = {"dataset": "imagefolder", "source": str(source), "kind": kind, "on_bad_image": on_bad_image}
    return _write_outputs(df, root, out_dir, kind, stamp, on_bad_image, progress)


def prepare_from_spec(name: str, spec: dict, resources: str | Path, out: Path, log=print,
                      progress: bool = False) -> Path:
    """``finetail prepare``: a dataset of the config (``spec``: kind ``registry`` or
    ``imagefolder`` and their keys) prepared into ``out``; with ``short_side``, the full-size
    manifest goes to ``out/original/`` and resized copies (and the manifest the pipeline reads)
    to ``out``. Warnings (a skipped bad image, a class without training images) go to ``log``
    as one line each. Returns the manifest's path."""
    kind = spec.get("kind")
    short_side = spec.get("short_side")
    on_bad_image = spec.get("on_bad_image", "error")
    if short_side and spec.get("store") == "array":
        raise ValueError(f"datasets.{name}: short_side applies to file stores, not store: array")
    target = out / "original" if short_side else out
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_args, **_kw: log(f"warning: {message}")
        if kind == "registry":
            path = prepare(spec.get("name", name), resources, target, base_url=spec.get("mirror"),
                           progress=progress, on_bad_image=on_bad_image)
        elif kind == "imagefolder":
            path = prepare_imagefolder(spec["source"], target, kind=spec.get("store", "files"),
                                       on_bad_image=on_bad_image, progress=progress)
        else:
            raise ValueError(f"finetail prepare handles kinds 'registry' and 'imagefolder', not {kind!r}")
        if not short_side:
            return Path(path)
        import shutil

        from .store import pre_resize

        resized = pre_resize(path, out / "resized", short_side, progress=progress)
        write_manifest(resized.assign(path="resized/" + resized["path"]), out / "manifest.parquet")
        for f in ("classes.csv", _STAMP):
            shutil.copyfile(target / f, out / f)
    return out / "manifest.parquet"
