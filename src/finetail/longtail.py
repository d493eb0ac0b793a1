"""Long-tailed subsets of balanced datasets (CIFAR-LT construction of the reference code).

Class ``i`` of ``C`` keeps ``n_i = int(n_max * (1/IF) ** (i / (C - 1)))`` training images
(the ``"exp"`` profile), the first ``n_i`` of a per-class shuffle with a fixed seed. The
``"step"`` profile keeps ``n_max`` images for the first half of the classes and
``int(n_max / IF)`` for the rest (Buda et al.). Test splits stay balanced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["PROFILES", "class_counts", "longtail_subset", "write_longtail"]

PROFILES = ("exp", "step")


def class_counts(n_max: int, num_classes: int, imbalance: float, profile: str = "exp") -> list[int]:
    """Per-class training counts of a long-tailed set.

    Parameters
    ----------
    n_max : images of the most frequent class (class 0).
    num_classes : C >= 2.
    imbalance : IF = n_max / n_min >= 1.
    profile : "exp" (reference formula) or "step".

    Examples
    --------
    >>> class_counts(5000, 10, 100)
    [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    """
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if imbalance < 1:
        raise ValueError(f"imbalance factor must be >= 1, got {imbalance}")
    if profile == "exp":
        return [int(n_max * (1.0 / imbalance) ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    if profile == "step":
        half = num_classes // 2
        return [n_max if i < half else int(n_max / imbalance) for i in range(num_classes)]
    raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")


def longtail_subset(
    manifest: pd.DataFrame, imbalance: float, profile: str = "exp", seed: int = 0, n_max: int | None = None
) -> pd.DataFrame:
    """Keep a long-tailed subset of a balanced manifest's training split.

    Classes are ordered by label; class ``label`` keeps the first ``n_i`` rows of a seeded
    per-class shuffle of its training rows. Test rows are kept whole. ``n_max`` defaults to
    the smallest class's training count (all classes must have at least ``n_i`` rows).

    Returns the subset, training rows first, in a deterministic order.
    """
    for col in ("label", "split"):
        if col not in manifest.columns:
            raise ValueError(f"manifest lacks the column {col!r}")
    train = manifest[manifest["split"] == "train"]
    labels = np.sort(train["label"].unique())
    num_classes = int(manifest["label"].max()) + 1
    if len(labels) != num_classes or labels[0] != 0:
        raise ValueError(f"training labels must be 0..{num_classes - 1}, found {len(labels)} distinct labels")
    have = train.groupby("label").size().reindex(range(num_classes)).to_numpy()
    if n_max is None:
        n_max = int(have.min())
    counts = class_counts(n_max, num_classes, imbalance, profile)
    short = [(c, int(h), n) for c, (h, n) in enumerate(zip(have, counts, strict=True)) if h < n]
    if short:
        raise ValueError(f"classes have fewer training images than the profile asks (label, have, need): {short[:5]}")
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for c, n in enumerate(counts):
        idx = train.index[train["label"].to_numpy() == c].to_numpy()
        keep.append(idx[rng.permutation(len(idx))[:n]])
    subset = manifest.loc[np.concatenate(keep)]
    return pd.concat([subset, manifest[manifest["split"] != "train"]])


def write_longtail(manifest: str | Path, imbalance: float, profile: str, seed: int, n_max: int | None,
                   out: Path) -> str:
    """``finetail longtail``: the long-tailed subset of a balanced manifest as
    ``out/manifest.parquet`` (rows pointing into the balanced set's store) and
    ``out/counts.csv``. Returns a log line."""
    from .manifest import class_table, read_manifest, rebase_store, write_manifest

    sub = longtail_subset(read_manifest(manifest), imbalance, profile, seed, n_max)
    sub = rebase_store(sub, manifest, out / "manifest.parquet")
    write_manifest(sub, out / "manifest.parquet")
    counts = class_table(sub)
    counts.to_csv(out / "counts.csv", index=False)
    return f"long-tailed {manifest} at IF {imbalance:g}: {int(counts['train_count'].sum())} training images"
