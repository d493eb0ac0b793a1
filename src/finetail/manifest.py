"""Manifests: the contract between stages.

A manifest is a parquet table, one row per image, with at least

- ``label`` (int, 0..C-1), ``class_name`` (str, a stable id), ``split`` ("train"/"test"),
- either ``store`` + ``index`` (a uint8 ``(N, H, W, 3)`` ``.npy`` array store, path relative to
  the manifest's folder, and the row in it) or ``path`` (an image file, relative likewise).

And the digests of the bytes the rows point to, so that the manifest's own sha256 covers
every pixel a result depends on (a job records the manifest's sha256; audit re-hashes):

- ``store_sha256`` (array manifests): sha256 of the ``.npy`` store the row points into,
  written with the store (:func:`write_array_dataset`);
- ``sha256`` (file manifests): sha256 of the row's image file, hashed once when the dataset
  is prepared, so jobs never re-hash the images.

Long-tailed and selected subsets are manifests that point into their parent's store, so no
image is copied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .fileio import atomic_write, file_sha256

__all__ = [
    "ArraySplit",
    "STORE_SHA256",
    "FILE_SHA256",
    "class_table",
    "data_files",
    "verify_array_stores",
    "load_array_split",
    "read_manifest",
    "split_rows",
    "write_array_dataset",
    "write_manifest",
]

REQUIRED = ("label", "class_name", "split")
STORE_SHA256 = "store_sha256"  # array manifests: sha256 of the row's .npy store
FILE_SHA256 = "sha256"  # file manifests: sha256 of the row's image file


def write_manifest(df: pd.DataFrame, path: str | Path) -> None:
    """Validate and write a manifest atomically."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"manifest lacks required columns {missing}")
    if "path" not in df.columns and not {"store", "index"} <= set(df.columns):
        raise ValueError("manifest needs either a 'path' column or 'store' and 'index' columns")
    bad = set(df["split"].unique()) - {"train", "test", "val"}
    if bad:
        raise ValueError(f"unknown split values {sorted(bad)}")
    atomic_write(path, lambda tmp: df.reset_index(drop=True).to_parquet(tmp, index=False))


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} does not exist: run the datasets stage that writes it")
    df = pd.read_parquet(path)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks required columns {missing}")
    return df


def write_array_dataset(
    folder: str | Path, images: np.ndarray, labels: np.ndarray, class_names: list[str], split: np.ndarray
) -> pd.DataFrame:
    """Write ``images.npy`` and ``manifest.parquet`` for an in-memory dataset; return the manifest."""
    folder = Path(folder)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(images))

    atomic_write(folder / "images.npy", save)
    df = pd.DataFrame(
        {
            "store": "images.npy",
            STORE_SHA256: file_sha256(folder / "images.npy"),
            "index": np.arange(len(images), dtype=np.int64),
            "label": labels.astype(np.int64),
            "class_name": np.asarray(class_names, dtype=object)[labels],
            "split": np.asarray(split, dtype=object),
        }
    )
    write_manifest(df, folder / "manifest.parquet")
    return df


def rebase_store(df: pd.DataFrame, src_manifest: str | Path, dst_manifest: str | Path) -> pd.DataFrame:
    """Rewrite the ``store``/``path`` columns of rows read from ``src_manifest`` to be relative
    to ``dst_manifest``'s folder (for manifests that point into another manifest's files)."""
    src_dir = Path(src_manifest).resolve().parent
    dst_dir = Path(dst_manifest).resolve().parent
    out = df.copy()
    for col in ("store", "path"):
        if col in out.columns:
            rel = {v: os.path.relpath(src_dir / v, dst_dir) for v in out[col].unique()}
            out[col] = out[col].map(rel)
    return out


def data_files(manifest_path: str | Path, df: pd.DataFrame | None = None) -> list[tuple[Path, str | None]]:
    """Every file a manifest's rows point to, with the sha256 the manifest records for it.

    Array manifests: each distinct store (``store_sha256``); file manifests: each image
    (``sha256``). The digest is ``None`` where the manifest records none (written before
    digests were recorded). Paths are resolved against the manifest's folder.
    """
    manifest_path = Path(manifest_path)
    df = read_manifest(manifest_path) if df is None else df
    col, sha = ("store", STORE_SHA256) if "store" in df.columns else ("path", FILE_SHA256)
    rows = df[[col, sha]] if sha in df.columns else df[[col]].assign(**{sha: None})
    rows = rows.drop_duplicates(col)
    out = []
    for name, digest in zip(rows[col], rows[sha], strict=True):
        p = Path(name)
        p = p if p.is_absolute() else Path(os.path.normpath(manifest_path.parent / p))
        out.append((p, None if pd.isna(digest) else str(digest)))
    return out


def verify_array_stores(manifest_path: str | Path, df: pd.DataFrame | None = None) -> dict[str, str]:
    """sha256 of each array store a manifest points into, checked against the recorded one.

    Returns ``{store path: sha256}``. Raises :class:`finetail.errors.UserError` naming the
    store when its bytes differ from what the manifest recorded (the pixels changed after the
    dataset was written: regenerate or re-prepare it).
    """
    from .errors import UserError

    out = {}
    for path, recorded in data_files(manifest_path, df):
        if not path.is_file():
            raise FileNotFoundError(f"{manifest_path} points into {path}, which does not exist")
        actual = file_sha256(path)
        if recorded is not None and actual != recorded:
            raise UserError(
                f"{path}: sha256 {actual[:12]} differs from {recorded[:12]} recorded in {manifest_path}; "
                "the images changed after the dataset was written (rerun its datasets stage)"
            )
        out[str(path)] = actual
    return out


def class_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per class: label, class_name, train_count, test_count."""
    names = df.groupby("label")["class_name"].first()
    counts = df.groupby(["label", "split"]).size().unstack(fill_value=0)
    out = pd.DataFrame({"label": names.index, "class_name": names.to_numpy()})
    for s in ("train", "test"):
        out[f"{s}_count"] = counts[s].reindex(names.index, fill_value=0).to_numpy() if s in counts else 0
    return out.reset_index(drop=True)


def split_rows(df: pd.DataFrame, split: str, source: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """The rows of one split of manifest ``df`` (read from ``source``), and all its class
    names by label (``class<i>`` for a label no row carries)."""
    names = df.groupby("label")["class_name"].first()
    class_names = [str(names.get(i, f"class{i}")) for i in range(int(df["label"].max()) + 1)]
    part = df[df["split"] == split]
    if part.empty:
        raise ValueError(f"{source} has no rows in split {split!r}")
    return part, class_names


@dataclass
class ArraySplit:
    """One split of an array-store manifest, in memory."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]  # all C classes of the manifest, by label


def load_array_split(manifest_path: str | Path, split: str) -> ArraySplit:
    """Load one split's images from the array store(s) a manifest points into."""
    manifest_path = Path(manifest_path)
    df = read_manifest(manifest_path)
    if "store" not in df.columns:
        raise ValueError(f"{manifest_path} is a file-based manifest; the array path needs a 'store' column")
    part, class_names = split_rows(df, split, manifest_path)
    chunks, labels = [], []
    for store, rows in part.groupby("store", sort=True):
        arr = np.load(manifest_path.parent / store, mmap_mode="r")
        chunks.append(np.asarray(arr[np.sort(rows["index"].to_numpy())]))
        labels.append(rows.sort_values("index")["label"].to_numpy())
    return ArraySplit(np.concatenate(chunks), np.concatenate(labels).astype(np.int64), class_names)
