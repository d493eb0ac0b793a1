"""Dataset nodes: from a manifest, through its ``store`` / ``path`` columns, to the dataset
folders' ``source.json`` (the generator's seed and settings, or each raw file's URL and
checksum)."""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..fileio import read_json
from ..layout import Layout, split_replicate

__all__ = ["SOURCE_JSON", "dataset_node", "manifest_sources"]

SOURCE_JSON = "source.json"
_MANIFEST = "manifest.parquet"


def _registry_files(sj: Mapping, folder: Path) -> list[dict]:
    urls: dict[str, str] = {}
    try:
        from ..datasets.registry import get

        urls = {f.filename: f.url for f in get(sj.get("dataset", folder.name)).files}
    except (ValueError, KeyError, ImportError):
        pass
    return [{"filename": name, "sha256": sha, "url": urls.get(name)} for name, sha in sj["files"].items()]


def dataset_node(folder: Path) -> dict:
    """A dataset folder and what its ``source.json`` says about its origin: ``origin``
    "finetail.world" (``seed``, ``world``, ``sizes``), "registry" (``files``: filename,
    sha256, url), "imagefolder" or "unknown"."""
    sj = read_json(folder / SOURCE_JSON)
    named, rep = split_replicate(folder)  # a generated dataset: one folder per world (rep<k>)
    node: dict[str, Any] = {"type": "dataset", "name": named.name, "folder": str(folder)}
    if rep is not None:
        node["replicate_key"] = rep
    if sj.get("source") == "finetail.world":
        world = sj.get("world", {})
        node.update(origin="finetail.world", seed=world.get("seed"), world=world, sizes=sj.get("sizes", {}),
                    images=sj.get("images"), classes=sj.get("classes"))
    elif isinstance(sj.get("files"), Mapping):
        node.update(origin="registry", dataset=sj.get("dataset"), license=sj.get("license"),
                    homepage=sj.get("homepage"), files=_registry_files(sj, folder))
    elif sj.get("dataset") == "imagefolder":
        node.update(origin="imagefolder", source=sj.get("source"), store=sj.get("kind"))
    else:
        node.update(origin="unknown", source_json=sj)
    return node


def _find_dataset_folder(path: Path, stop: Path | None) -> Path | None:
    """The nearest folder at or above ``path`` holding ``source.json`` (not above ``stop``)."""
    for d in (path, *path.parents):
        if (d / SOURCE_JSON).is_file():
            return d
        if stop is not None and d == stop:
            break
    return None


def _file_dataset_roots(results_dir: Path | None) -> dict[Path, Path]:
    """Root of the image files of each file-store dataset -> its dataset folder (registry
    datasets keep their files under resources/, away from source.json)."""
    import pandas as pd

    roots: dict[Path, Path] = {}
    if results_dir is None:
        return roots
    pattern = Layout.at(glob.escape(str(results_dir))).dataset("*", SOURCE_JSON)
    for sj in sorted(Path(p) for p in glob.glob(pattern)):
        m = sj.parent / _MANIFEST
        if not m.is_file():
            continue
        df = pd.read_parquet(m)
        if "path" not in df.columns or df.empty:
            continue
        parents = {os.path.normpath(m.parent / os.path.dirname(p)) for p in df["path"].unique()}
        roots[Path(os.path.commonpath(sorted(parents)))] = sj.parent
    return roots


def _pointed_dirs(manifest: Path) -> list[Path]:
    """The folders a manifest's ``store`` files and ``path`` files lie in."""
    import pandas as pd
    import pyarrow.parquet as pq

    cols = [c for c in ("store", "path") if c in pq.read_schema(manifest).names]
    if not cols:
        return []
    df = pd.read_parquet(manifest, columns=cols)
    dirs = set()
    for col in cols:
        for v in df[col].dropna().unique():
            dirs.add(Path(os.path.normpath(manifest.parent / (v if col == "store" else os.path.dirname(v)))))
    return sorted(dirs)


def manifest_sources(manifest: Path, results_dir: Path | None) -> list[dict]:
    """Dataset nodes a manifest's rows point into (through ``store`` or ``path``), and one
    ``unknown`` node for rows pointing into folders with no ``source.json``."""
    if (manifest.parent / SOURCE_JSON).is_file():
        return [dataset_node(manifest.parent)]
    folders: list[Path] = []
    unmatched: list[Path] = []
    roots = None
    for d in _pointed_dirs(manifest):
        start = d.parent if d.suffix else d  # a store file -> its folder
        f = _find_dataset_folder(start, results_dir)
        if f is None:
            if roots is None:
                roots = _file_dataset_roots(results_dir)
            f = next((ds for root, ds in roots.items() if start == root or root in start.parents), None)
        if f is None:
            unmatched.append(start)
        elif f not in folders:
            folders.append(f)
    nodes = [dataset_node(f) for f in folders]
    if unmatched:
        nodes.append({"type": "unknown", "note": "rows point into folders with no source.json",
                      "folders": [str(u) for u in unmatched[:5]], "count": len(unmatched)})
    return nodes
