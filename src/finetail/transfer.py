"""Transfer sources (rule ``pool_source``): one manifest per source, pooling its datasets.

A source is one or more datasets (``transfer.sources``), the classes the greedy selection
chose from the pool (``transfer.selection``), or its random counterpart (``selection.random``:
classes drawn at random, and a drawn number of each one's training images). Pretraining on it and fine-tuning from it are
training jobs (:mod:`finetail.training`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .manifest import class_table, read_manifest, rebase_store, write_manifest

__all__ = ["pool_sources"]


def _keep_images(df: pd.DataFrame, images: pd.Series, seed: int) -> pd.DataFrame:
    """Of each class named in ``images`` (class name -> count), that many of its training rows,
    drawn without replacement with ``numpy.random.default_rng(seed)`` (classes in name order);
    its test rows all stay."""
    rng = np.random.default_rng(seed)
    train = df["split"] == "train"
    drop = []
    for name in sorted(images.index):
        rows = np.flatnonzero(train.to_numpy() & (df["class_name"] == name).to_numpy())
        n = int(images[name])
        if n > len(rows):
            raise ValueError(f"class {name!r} has {len(rows)} training images; {n} were asked for")
        drop.extend(np.setdiff1d(rows, rng.choice(rows, size=n, replace=False)).tolist())
    return df.drop(index=df.index[drop])


def pool_sources(inputs: list[str], classes: str | None, out_dir: Path, seed: int = 0) -> str:
    """Concatenate source manifests (optionally only the classes named in the CSV ``classes``)
    into ``out_dir/manifest.parquet``, relabelled 0..C-1 in (source, label) order, with its
    ``classes.csv``. Class names must be unique across the inputs. When ``classes`` has an
    ``images`` column (a random source, :func:`finetail.selection.random_subset`), each class
    keeps that many of its training images, drawn with ``seed``. Returns a log line."""
    out = out_dir / "manifest.parquet"
    parts = []
    for m in inputs:
        parts.append(rebase_store(read_manifest(m), m, out).assign(source=Path(m).parent.name))
    df = pd.concat(parts, ignore_index=True)
    dup = df.groupby("class_name")["source"].nunique()
    if (dup > 1).any():
        raise ValueError(f"class names shared between pooled sources: {sorted(dup[dup > 1].index)[:5]}")
    if classes:
        keep = pd.read_csv(classes)["class_name"]
        missing = sorted(set(keep) - set(df["class_name"]))
        if missing:
            raise ValueError(f"{classes} names classes that no input has: {missing[:5]}")
        df = df[df["class_name"].isin(set(keep))].reset_index(drop=True)
        table = pd.read_csv(classes)
        if "images" in table.columns:
            df = _keep_images(df, table.set_index("class_name")["images"], seed).reset_index(drop=True)
    order = df.drop_duplicates("class_name")[["source", "label", "class_name"]].sort_values(["source", "label"])
    relabel = {c: i for i, c in enumerate(order["class_name"])}
    df = df.assign(label=df["class_name"].map(relabel).astype("int64"))
    write_manifest(df, out)
    class_table(df).to_csv(out_dir / "classes.csv", index=False)
    return f"pooled {len(inputs)} manifest(s): {len(relabel)} classes, {int((df['split'] == 'train').sum())} training images"
