"""Image stores: a uint8 array for small images, resized JPEG copies for large ones.

- :func:`to_array_store` decodes every image of a manifest once into ``images.npy``
  (uint8 ``N x H x W x 3``) and writes a manifest with ``store`` + ``index`` columns, so
  :func:`finetail.manifest.load_array_split` loads a split in one read.
- :func:`pre_resize` writes JPEG copies with a given short side (aspect kept) and a manifest
  pointing at them: an optional speed-up for large-image datasets.

Both accept a manifest as a path (its ``path`` column relative to the manifest's folder) or
as a DataFrame with ``root`` (its ``path`` column relative to ``root``, or absolute). A row
with a ``row`` value reads that row of a pickled CIFAR batch (the file at ``path``).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..manifest import read_manifest, write_array_dataset, write_manifest

__all__ = ["pre_resize", "read_image", "to_array_store"]


def _resolve(manifest: str | Path | pd.DataFrame, root: str | Path | None) -> tuple[pd.DataFrame, Path]:
    if isinstance(manifest, pd.DataFrame):
        if root is None:
            raise ValueError("a DataFrame manifest needs root= (the folder its paths are relative to)")
        df, base = manifest, Path(root)
    else:
        df = read_manifest(manifest)
        base = Path(root) if root is not None else Path(manifest).parent
    if "path" not in df.columns:
        raise ValueError("the manifest needs a 'path' column (image files or CIFAR batches)")
    return df.reset_index(drop=True), base


class _CifarBatches:
    """Reads rows of pickled CIFAR batches, keeping the last batch in memory."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._data: np.ndarray | None = None

    def __call__(self, path: Path, row: int) -> np.ndarray:
        if path != self._path:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
            self._data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            self._path = path
        return self._data[row]


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 RGB ``(H, W, 3)``."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def to_array_store(
    manifest: str | Path | pd.DataFrame, out_dir: str | Path, root: str | Path | None = None
) -> pd.DataFrame:
    """Decode every image once into ``out_dir/images.npy`` and write ``out_dir/manifest.parquet``.

    Parameters
    ----------
    manifest : str, Path or DataFrame
        A file manifest (``path``, ``label``, ``class_name``, ``split``; optional ``row`` for
        CIFAR batches).
    out_dir : str or Path
        Output folder.
    root : str or Path, optional
        The folder the manifest's paths are relative to (default: the manifest's folder).

    Returns
    -------
    pandas.DataFrame
        The written manifest: ``store``, ``index``, ``label``, ``class_name``, ``split``,
        in the input's row order.

    Raises
    ------
    ValueError
        Images of different sizes (use ``kind="files"`` and :func:`pre_resize` instead).
    """
    df, base = _resolve(manifest, root)
    if df.empty:
        raise ValueError("empty manifest: nothing to store")
    cifar = _CifarBatches()
    has_row = "row" in df.columns
    first = None
    images = None
    for i, rec in enumerate(df.itertuples(index=False)):
        path = base / rec.path
        row = getattr(rec, "row", None) if has_row else None
        if row is not None and not pd.isna(row):
            img = cifar(path, int(row))
        else:
            img = read_image(path)
        if images is None:
            first = img.shape
            images = np.empty((len(df), *first), dtype=np.uint8)
        elif img.shape != first:
            raise ValueError(f"{path}: image shape {img.shape} differs from the first image's {first}; an array store needs one size")
        images[i] = img
    labels = df["label"].to_numpy(dtype=np.int64)
    names = df.groupby("label")["class_name"].first()
    class_names = [str(names.get(k, f"class{k}")) for k in range(int(labels.max()) + 1)]
    return write_array_dataset(Path(out_dir), images, labels, class_names, df["split"].to_numpy(dtype=object))


def pre_resize(
    manifest: str | Path | pd.DataFrame,
    out_dir: str | Path,
    short_side: int,
    root: str | Path | None = None,
    quality: int = 90,
) -> pd.DataFrame:
    """Write JPEG copies whose short side is ``short_side`` (aspect kept) and their manifest.

    Images whose short side is already at most ``short_side`` are re-encoded, not enlarged.
    Copies go to ``out_dir/images/<row, 7 digits>.jpg``; an existing copy is kept, so an
    interrupted run continues where it stopped.

    Parameters
    ----------
    manifest : str, Path or DataFrame
        A file manifest.
    out_dir : str or Path
        Output folder; ``out_dir/manifest.parquet`` is written last.
    short_side : int
        Target length of the shorter side, pixels.
    root : str or Path, optional
        The folder the manifest's paths are relative to (default: the manifest's folder).
    quality : int
        JPEG quality.

    Returns
    -------
    pandas.DataFrame
        The new manifest (``path`` relative to ``out_dir``, ``width``, ``height``).
    """
    if int(short_side) < 1:
        raise ValueError(f"short_side must be a positive number of pixels, got {short_side}")
    df, base = _resolve(manifest, root)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    paths, widths, heights = [], [], []
    for i, rel in enumerate(df["path"]):
        dst_rel = f"images/{i:07d}.jpg"
        dst = out_dir / dst_rel
        if dst.exists():
            with Image.open(dst) as im:
                w, h = im.size
        else:
            with Image.open(base / rel) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = short_side / min(w, h)
                if scale < 1:
                    w, h = max(1, round(w * scale)), max(1, round(h * scale))
                    im = im.resize((w, h), Image.Resampling.BICUBIC)
                tmp = dst.with_name(dst.name + ".tmp")
                im.save(tmp, format="JPEG", quality=quality)
                os.replace(tmp, dst)
        paths.append(dst_rel)
        widths.append(w)
        heights.append(h)
    out = df.drop(columns=[c for c in ("row", "width", "height") if c in df.columns]).copy()
    out["path"] = paths
    out["width"] = np.asarray(widths, dtype=np.int64)
    out["height"] = np.asarray(heights, dtype=np.int64)
    write_manifest(out, out_dir / "manifest.parquet")
    return out
