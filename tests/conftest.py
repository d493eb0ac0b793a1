"""Shared fixtures: a tiny learnable image dataset written as a real manifest + array store;
:func:`require`, the one rule for a test whose environment lacks something (data, a browser,
Slurm, mount rights). Shared helpers that are not fixtures live in ``helpers.py``."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from finetail.manifest import write_array_dataset

ROOT = Path(__file__).resolve().parents[1]


def under_ci() -> bool:
    """``CI`` is set to true/1/yes (``.ci/run`` sets ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(condition: object, why: str) -> None:
    """Skip the calling test unless ``condition`` holds, saying ``why``; under CI (:func:`under_ci`)
    fail it instead: CI proves everything, so a missing data copy, browser or Slurm is a failure
    there, never a silent skip."""
    if condition:
        return
    if under_ci():
        pytest.fail(f"{why} (CI is set: a test that cannot run fails)", pytrace=False)
    pytest.skip(why)


def toy_images(n_per_class: int, num_classes: int = 3, size: int = 16, seed: int = 0):
    """Class c is a bright square in quadrant c (plus noise): easy for a CNN, hard for chance."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    imgs = rng.integers(0, 60, size=(len(labels), size, size, 3)).astype(np.uint8)
    h = size // 2
    for i, c in enumerate(labels):
        y0, x0 = (c // 2) * h, (c % 2) * h
        imgs[i, y0 + 1 : y0 + h - 1, x0 + 1 : x0 + h - 1, c % 3] = 230
    return imgs, labels


def assert_same_weights(a, b) -> None:
    """Two models (or state_dicts) hold bit-identical tensors under the same names."""
    a = a.state_dict() if hasattr(a, "state_dict") else a
    b = b.state_dict() if hasattr(b, "state_dict") else b
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def write_toy_manifest(folder: Path, n_train: int, n_test: int, names=("c0", "c1", "c2")) -> Path:
    """``toy_images`` (n_train, n_test per class) as a real array-store manifest in ``folder``."""
    xtr, ytr = toy_images(n_train, num_classes=len(names), seed=0)
    xte, yte = toy_images(n_test, num_classes=len(names), seed=1)
    split = np.array(["train"] * len(ytr) + ["test"] * len(yte), dtype=object)
    write_array_dataset(folder, np.concatenate([xtr, xte]), np.concatenate([ytr, yte]), list(names), split)
    return folder / "manifest.parquet"


@pytest.fixture
def toy_manifest(tmp_path):
    return write_toy_manifest(tmp_path / "toy", 24, 10)


def write_toy_file_manifest(folder: Path, n_train: int, n_test: int, num_classes: int = 3, height: int = 40,
                            width: int = 48, ext: str = "png") -> tuple[Path, np.ndarray, np.ndarray]:
    """``toy_images`` as image files (PNG: lossless) under ``folder`` with a file manifest;
    returns the manifest's path and the training split's images (N, H, W, 3) and labels, as
    an array-store manifest would hold them."""
    import pandas as pd
    from PIL import Image

    from finetail.manifest import write_manifest

    rows, train = [], None
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        imgs, labels = toy_images(n, num_classes=num_classes, size=max(height, width), seed=seed)
        imgs = np.ascontiguousarray(imgs[:, :height, :width])
        if split == "train":
            train = (imgs, labels)
        for i, (img, y) in enumerate(zip(imgs, labels, strict=True)):
            rel = f"images/{split}/c{y}/{i}.{ext}"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / rel)
            rows.append({"path": rel, "label": int(y), "class_name": f"c{y}", "split": split})
    write_manifest(pd.DataFrame(rows), folder / "manifest.parquet")
    return folder / "manifest.parquet", *train
