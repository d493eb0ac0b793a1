"""Image stores: a uint8 array for small images, resized JPEG copies for large ones.

- :func:`to_array_store` decodes every image of a manifest once into ``images.npy``
  (uint8 ``N x H x W x 3``) and writes a manifest with ``store`` + ``index`` columns, so
  :func:`finetail.manifest.load_array_split` loads a split in one read.
- :func:`pre_resize` writes JPEG copies with a given short side (aspect kept) and a manifest
  pointing at them: an optional speed-up for large-image datasets.

- :func:`check_image_files` decodes every image of a file manifest once and records each
  file's sha256 (the manifest's ``sha256`` column), so a bad file fails at prepare time,
  named, and training jobs never re-hash the images.

They accept a manifest as a path (its ``path`` column relative to the manifest's folder) or
as a DataFrame with ``root`` (its ``path`` column relative to ``root``, or absolute). A row
with a ``row`` value reads that row of a pickled CIFAR batch (the file at ``path``).

Images are read as they are: 16-bit images (PNG ``I;16``, ``I``, 16-bit RGB) are scaled to
8 bits by keeping the high byte (``v >> 8``: 20000 -> 78), never clipped. A corrupt,
truncated, empty or non-image file raises :class:`BadImageError` (one line naming the file
and what is wrong), or with ``on_bad_image="skip"`` its row is dropped with a
:class:`BadImageWarning`.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import sys
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..errors import UserError
from ..fileio import atomic_write
from ..manifest import FILE_SHA256, read_manifest, write_array_dataset, write_manifest

__all__ = [
    "ON_BAD_IMAGE",
    "BadImageError",
    "BadImageWarning",
    "check_image_files",
    "check_on_bad_image",
    "decode_image",
    "pre_resize",
    "read_image",
    "to_array_store",
]

ON_BAD_IMAGE = ("error", "skip")
_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF8": "GIF", b"RIFF": "WebP", b"BM": "BMP"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # PIL modes of 16-bit (grey) images
# What Pillow raises on a corrupt file, by decoder: OSError (truncated, broken stream),
# SyntaxError (bad PNG chunks), struct.error / zlib.error / EOFError / IndexError / KeyError /
# TypeError (damaged headers and tags), ValueError, and a decompression bomb.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, KeyError,
                  TypeError, Image.DecompressionBombError)


class BadImageError(UserError):
    """An image file that cannot be read: empty, truncated, corrupt or not an image. The
    message is one line: ``<path>: <what is wrong>``."""


class BadImageWarning(UserWarning):
    """A bad image skipped because ``on_bad_image="skip"``."""


def check_on_bad_image(on_bad_image: str) -> None:
    """ValueError unless ``on_bad_image`` is one of :data:`ON_BAD_IMAGE`."""
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")


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
            self._data = self._load(path)
            self._path = path
        if not 0 <= row < len(self._data):
            raise UserError(f"{path}: the manifest asks for row {row}, but the batch holds {len(self._data)} images")
        return self._data[row]

    @staticmethod
    def _load(path: Path) -> np.ndarray:
        """A batch's images, uint8 (N, 32, 32, 3); UserError naming the file if it is not a
        CIFAR python batch (a damaged archive: delete it and prepare again)."""
        raw = _read_bytes(path)
        try:
            d = pickle.loads(raw, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
            raise UserError(f"{path}: not a readable CIFAR python batch ({type(e).__name__}: {e}); "
                            "delete the archive and prepare again") from None
        d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()} if isinstance(d, dict) else {}
        data = np.asarray(d.get("data", []), dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise UserError(f"{path}: not a CIFAR python batch (no 'data' array of N x 3072 bytes); "
                            "delete the archive and prepare again")
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _to_rgb8(im: Image.Image, name: str) -> np.ndarray:
    """A loaded PIL image as uint8 RGB ``(H, W, 3)``; 16-bit grey scaled by ``>> 8``."""
    if im.mode in _SIXTEEN_BIT:
        a = np.asarray(im)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 0xFFFF):
            raise BadImageError(f"{name}: 32-bit integer pixels (range {int(a.min())}..{int(a.max())}); "
                                "convert the image to 8 or 16 bits")
        grey = (a.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise BadImageError(f"{name}: 32-bit floating-point pixels; convert the image to 8 or 16 bits")
    # 16-bit RGB(A) PNGs open as RGB(A) holding the high byte of each sample (Pillow's
    # "RGB;16B" raw mode), i.e. already v >> 8.
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _decode(data: bytes, name: str, full: bool = True) -> np.ndarray | None:
    """Decode image bytes; :class:`BadImageError` naming ``name`` if they are not a readable
    image. With ``full=False`` only check: JPEGs decode at 1/8 scale (every byte of the
    compressed stream is still read, so a truncated file is still caught) and nothing is
    returned."""
    if not data:
        raise BadImageError(f"{name}: empty file (0 bytes)")
    magic = next((f for m, f in _MAGIC.items() if data.startswith(m)), None)
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if magic is not None:
            raise BadImageError(f"{name}: cannot decode (truncated or corrupt {magic} header)") from None
        text = all(32 <= c < 127 or c in b"\t\r\n" for c in data[:64])
        raise BadImageError(f"{name}: not an image (no image format recognised{'; it looks like text' if text else ''})") from None
    except _DECODE_ERRORS as e:
        raise BadImageError(f"{name}: cannot decode ({_what(magic or 'image', e)})") from None
    fmt = im.format or magic or "image"
    with im:
        try:
            if not full and fmt == "JPEG":
                im.draft(im.mode, (1, 1))
            im.load()
        except _DECODE_ERRORS as e:
            raise BadImageError(f"{name}: cannot decode ({_what(fmt, e)})") from None
        return _to_rgb8(im, name) if full else None


def _what(fmt: str, e: Exception) -> str:
    """'truncated JPEG', or the format and Pillow's reason."""
    return f"truncated {fmt}" if "truncated" in str(e).lower() else f"{fmt}: {e}"


def decode_image(data: bytes, name: str | Path = "<bytes>") -> np.ndarray:
    """Decode image bytes to uint8 RGB ``(H, W, 3)``, 16-bit images scaled to 8 bits (``v >> 8``).

    Raises
    ------
    BadImageError
        Empty, truncated, corrupt or not an image; the message names ``name``.
    """
    return _decode(data, str(name))


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 RGB ``(H, W, 3)`` (see :func:`decode_image`)."""
    return decode_image(Path(path).read_bytes(), path)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadImageError(f"{path}: no such file") from None
    except OSError as e:
        raise BadImageError(f"{path}: cannot read the file ({e.strerror or e})") from None


def _check_one(path: Path) -> str | BadImageError:
    """The file's sha256 after a check decode, or the BadImageError it raised."""
    try:
        data = _read_bytes(path)
        _decode(data, str(path), full=False)
    except BadImageError as e:
        return e
    return hashlib.sha256(data).hexdigest()


def _ordered_map(fn, items: list, workers: int, window: int = 1024):
    """``map(fn, items)`` on ``workers`` threads, in order, with at most ``window`` items in
    flight (a million-image dataset does not become a million futures); on an early exit the
    items not yet started are cancelled."""
    pool = ThreadPoolExecutor(workers)
    try:
        for start in range(0, len(items), window):
            yield from pool.map(fn, items[start : start + window])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, unit="img", desc=desc, disable=not progress or not sys.stderr.isatty())


def _warn_skipped(n_bad: int, total: int) -> None:
    warnings.warn(f"skipped {n_bad} of {total} images that cannot be read (on_bad_image: skip)", BadImageWarning,
                  stacklevel=3)


def check_image_files(
    manifest: str | Path | pd.DataFrame,
    root: str | Path | None = None,
    on_bad_image: str = "error",
    progress: bool = False,
    workers: int | None = None,
) -> pd.DataFrame:
    """Decode every image of a file manifest once and record each file's sha256.

    Parameters
    ----------
    manifest : str, Path or DataFrame
        A file manifest (``path`` column).
    root : str or Path, optional
        The folder its paths are relative to (default: the manifest's folder).
    on_bad_image : {"error", "skip"}
        An empty, truncated, corrupt or non-image file raises :class:`BadImageError`
        (``"error"``), or its row is dropped with a :class:`BadImageWarning` naming it and a
        last warning with the count (``"skip"``).
    progress : bool
        A tqdm bar on a terminal.
    workers : int, optional
        Reading threads (default: the CPUs available, at most 8; decoding and hashing release
        the GIL).

    Returns
    -------
    pandas.DataFrame
        The readable rows, in order, with a ``sha256`` column (:data:`finetail.manifest.FILE_SHA256`)
        holding the sha256 of the bytes that were decoded.

    Raises
    ------
    BadImageError
        A bad (or missing) image with ``on_bad_image="error"``, or no readable image at all.
    """
    check_on_bad_image(on_bad_image)
    df, base = _resolve(manifest, root)
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = max(1, min(8, cpus))
    paths = [base / p for p in df["path"]]
    digests, keep, bad = [], np.ones(len(df), dtype=bool), []
    with closing(_ordered_map(_check_one, paths, workers)) as results, _bar(len(paths), "checking images", progress) as bar:
        for i, res in enumerate(results):
            bar.update(1)
            if isinstance(res, BadImageError):
                if on_bad_image == "error":
                    raise res
                warnings.warn(f"{res}; skipped (on_bad_image: skip)", BadImageWarning, stacklevel=2)
                keep[i] = False
                bad.append(str(paths[i]))
                res = None
            digests.append(res)
    out = df.assign(**{FILE_SHA256: digests})[keep].reset_index(drop=True)
    if bad:
        _warn_skipped(len(bad), len(df))
    if out.empty:
        raise BadImageError(f"none of the {len(df)} images can be read (the first: {bad[0]})")
    return out


def to_array_store(
    manifest: str | Path | pd.DataFrame,
    out_dir: str | Path,
    root: str | Path | None = None,
    on_bad_image: str = "error",
    progress: bool = False,
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
    on_bad_image : {"error", "skip"}
        An empty, truncated, corrupt or non-image file raises :class:`BadImageError`, or
        (``"skip"``) its row is left out with a :class:`BadImageWarning`. A damaged CIFAR
        batch is always an error.
    progress : bool
        A tqdm bar on a terminal.

    Returns
    -------
    pandas.DataFrame
        The written manifest: ``store``, ``index``, ``label``, ``class_name``, ``split``,
        in the input's row order (without skipped rows).

    Raises
    ------
    ValueError
        Images of different sizes (use ``kind="files"`` and :func:`pre_resize` instead).
    BadImageError
        A bad image with ``on_bad_image="error"``, or no readable image at all.
    """
    check_on_bad_image(on_bad_image)
    df, base = _resolve(manifest, root)
    if df.empty:
        raise ValueError("empty manifest: nothing to store")
    cifar = _CifarBatches()
    has_row = "row" in df.columns
    first = None
    images = None
    keep, bad = np.ones(len(df), dtype=bool), 0
    with _bar(len(df), "decoding images", progress) as bar:
        for i, rec in enumerate(df.itertuples(index=False)):
            bar.update(1)
            path = base / rec.path
            row = getattr(rec, "row", None) if has_row else None
            if row is not None and not pd.isna(row):
                img = cifar(path, int(row))
            else:
                try:
                    img = decode_image(_read_bytes(path), path)
                except BadImageError as e:
                    if on_bad_image == "error":
                        raise
                    warnings.warn(f"{e}; skipped (on_bad_image: skip)", BadImageWarning, stacklevel=2)
                    keep[i], bad = False, bad + 1
                    continue
            if images is None:
                first = img.shape
                images = np.empty((len(df), *first), dtype=np.uint8)
            elif img.shape != first:
                raise ValueError(f"{path}: image shape {img.shape} differs from the first image's {first}; an array store needs one size")
            images[i] = img
    if images is None:
        raise BadImageError(f"none of the {len(df)} images can be read (the first: {base / df['path'].iloc[0]})")
    if bad:
        _warn_skipped(bad, len(df))
        images, df = images[keep], df[keep].reset_index(drop=True)
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
    progress: bool = False,
) -> pd.DataFrame:
    """Write JPEG copies whose short side is ``short_side`` (aspect kept) and their manifest.

    Images whose short side is already at most ``short_side`` are re-encoded, not enlarged
    (16-bit images are scaled to 8 bits first, see :func:`decode_image`). Copies go to
    ``out_dir/images/<row, 7 digits>.jpg``; an existing copy is kept, so an interrupted run
    continues where it stopped. The manifest's ``sha256`` column holds the copies' digests.

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
    progress : bool
        A tqdm bar on a terminal.

    Returns
    -------
    pandas.DataFrame
        The new manifest (``path`` relative to ``out_dir``, ``width``, ``height``, ``sha256``).

    Raises
    ------
    BadImageError
        A source image cannot be read (``prepare`` has checked them already).
    """
    if int(short_side) < 1:
        raise ValueError(f"short_side must be a positive number of pixels, got {short_side}")
    df, base = _resolve(manifest, root)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    paths, widths, heights, digests = [], [], [], []
    with _bar(len(df), "resizing images", progress) as bar:
        for i, rel in enumerate(df["path"]):
            bar.update(1)
            dst_rel = f"images/{i:07d}.jpg"
            dst = out_dir / dst_rel
            if dst.exists():
                data = dst.read_bytes()
                with Image.open(io.BytesIO(data)) as im:
                    w, h = im.size
            else:
                im = Image.fromarray(read_image(base / rel))
                w, h = im.size
                scale = short_side / min(w, h)
                if scale < 1:
                    w, h = max(1, round(w * scale)), max(1, round(h * scale))
                    im = im.resize((w, h), Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=quality)
                data = buf.getvalue()
                atomic_write(dst, lambda tmp, data=data: tmp.write_bytes(data))
            paths.append(dst_rel)
            widths.append(w)
            heights.append(h)
            digests.append(hashlib.sha256(data).hexdigest())
    out = df.drop(columns=[c for c in ("row", "width", "height", FILE_SHA256) if c in df.columns]).copy()
    out["path"] = paths
    out["width"] = np.asarray(widths, dtype=np.int64)
    out["height"] = np.asarray(heights, dtype=np.int64)
    out[FILE_SHA256] = digests
    write_manifest(out, out_dir / "manifest.parquet")
    return out
