"""ImageFolder manifests (tree and CSV), the uint8 array store and pre-resized copies."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_builders import jpeg, make_tar
from finetail.datasets import imagefolder, pre_resize, prepare_imagefolder, to_array_store
from finetail.manifest import load_array_split, read_manifest

from conftest import require

CIFAR_JPEG = Path("/work/shared/data/cifar10-jpeg.tar.gz")
ROOT = Path(__file__).resolve().parents[1]
for candidate in (ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz", CIFAR_JPEG):
    if candidate.exists():
        CIFAR_JPEG = candidate
        break


def _tree(root: Path, layout: dict[str, dict[str, int]], size=(8, 6)) -> None:
    seed = 0
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                (root / split / cls / f"{k:04d}.jpg").write_bytes(jpeg(seed, size))
                seed += 1


def test_imagefolder_tree_sorted_labels(tmp_path):
    _tree(tmp_path / "data", {"train": {"zebra": 2, "ant": 3, "moth": 1}, "test": {"ant": 1, "zebra": 1, "moth": 1}, "val": {"ant": 1}})
    (tmp_path / "data" / "train" / "ant" / "notes.txt").write_text("not an image")
    df = imagefolder(tmp_path / "data")
    assert df.groupby("label")["class_name"].first().tolist() == ["ant", "moth", "zebra"]
    assert df["split"].value_counts().to_dict() == {"train": 6, "test": 3, "val": 1}
    assert all((tmp_path / "data" / p).is_file() for p in df["path"])
    out = prepare_imagefolder(tmp_path / "data", tmp_path / "out")
    m = read_manifest(out)
    assert all((out.parent / p).is_file() for p in m["path"])
    assert m["path"].str.startswith("../data/").all()
    with pytest.raises(ValueError, match="no images"):
        imagefolder(tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        imagefolder(tmp_path / "missing")


def test_imagefolder_csv(tmp_path):
    _tree(tmp_path / "imgs", {"all": {"b": 2, "a": 2}})
    rows = [
        ("imgs/all/b/0000.jpg", "b", "train"),
        ("imgs/all/b/0001.jpg", "b", "Test"),
        ("imgs/all/a/0000.jpg", "a", "train"),
        ("imgs/all/a/0001.jpg", "a", "validation"),
    ]
    csv = tmp_path / "m.csv"
    pd.DataFrame(rows, columns=["path", "class_name", "split"]).to_csv(csv, index=False)
    df = imagefolder(csv)
    assert df["label"].tolist() == [1, 1, 0, 0]
    assert df["split"].tolist() == ["train", "test", "train", "val"]
    out = prepare_imagefolder(csv, tmp_path / "o")
    m = read_manifest(out)
    assert all((out.parent / p).is_file() for p in m["path"])
    # label only
    pd.DataFrame({"path": [r[0] for r in rows], "label": [3, 3, 0, 0], "split": ["train", "test", "train", "test"]}).to_csv(csv, index=False)
    assert imagefolder(csv)["class_name"].tolist() == ["3", "3", "0", "0"]
    pd.DataFrame({"path": ["x.jpg"], "label": [0], "split": ["holdout"]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="holdout"):
        imagefolder(csv)
    pd.DataFrame({"path": ["x.jpg"], "split": ["train"]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="class_name"):
        imagefolder(csv)


def test_array_store_round_trip_and_size_check(tmp_path):
    _tree(tmp_path / "d", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}, size=(16, 16))
    out = prepare_imagefolder(tmp_path / "d", tmp_path / "o", kind="array")
    m = read_manifest(out)
    assert {"store", "index"} <= set(m.columns) and "path" not in m.columns
    tr = load_array_split(out, "train")
    assert tr.images.shape == (4, 16, 16, 3) and tr.class_names == ["a", "b"]
    src = imagefolder(tmp_path / "d")
    first = src[src["split"] == "train"].iloc[0]
    ref = np.asarray(Image.open(tmp_path / "d" / first["path"]).convert("RGB"))
    np.testing.assert_array_equal(tr.images[0], ref)
    (tmp_path / "d" / "train" / "a" / "big.jpg").write_bytes(jpeg(99, (20, 16)))
    with pytest.raises(ValueError, match="one size"):
        prepare_imagefolder(tmp_path / "d", tmp_path / "o2", kind="array")
    with pytest.raises(ValueError, match="root="):
        to_array_store(src, tmp_path / "o3")


def test_pre_resize(tmp_path):
    _tree(tmp_path / "d", {"train": {"a": 2}, "test": {"a": 1}}, size=(40, 20))
    (tmp_path / "d" / "test" / "a" / "small.jpg").write_bytes(jpeg(5, (8, 6)))
    src = prepare_imagefolder(tmp_path / "d", tmp_path / "files")
    m = pre_resize(src, tmp_path / "small", short_side=10)
    assert sorted(zip(m["width"], m["height"])) == [(8, 6), (20, 10), (20, 10), (20, 10)]
    back = read_manifest(tmp_path / "small" / "manifest.parquet")
    for p, w, h in zip(back["path"], back["width"], back["height"]):
        assert Image.open(tmp_path / "small" / p).size == (w, h)
    assert back["label"].tolist() == read_manifest(src)["label"].tolist()
    with pytest.raises(ValueError, match="short_side"):
        pre_resize(src, tmp_path / "x", short_side=0)


def test_array_store_on_real_cifar10_jpeg_subset(tmp_path):
    """A subset of the real CIFAR-10 JPEG release (first 12 train / 4 test images a class) as an archive."""
    require(CIFAR_JPEG.exists(), f"{CIFAR_JPEG} not present (the clone is not beside shared/)")
    keep: dict[str, bytes] = {}
    per: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR_JPEG, "r:gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) != 3:
                continue
            key = (parts[0], parts[1])
            limit = 12 if parts[0] == "train" else 4
            if per.get(key, 0) < limit:
                per[key] = per.get(key, 0) + 1
                keep[m.name] = tf.extractfile(m).read()
            if len(per) == 20 and all(v >= (12 if s == "train" else 4) for (s, _), v in per.items()):
                break
    archive = tmp_path / "cifar10-jpeg-subset.tar.gz"
    archive.write_bytes(make_tar(keep))
    out = prepare_imagefolder(archive, tmp_path / "cifar10", kind="array")
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    tr, te = load_array_split(out, "train"), load_array_split(out, "test")
    assert tr.images.shape == (120, 32, 32, 3) and te.images.shape == (40, 32, 32, 3)
    assert tr.class_names == classes
    assert np.bincount(tr.labels).tolist() == [12] * 10
    m = read_manifest(out)
    row = m[(m["split"] == "test")].iloc[0]
    name = sorted(n for n in keep if n.startswith(f"test/{row['class_name']}/"))[0]
    ref = np.asarray(Image.open(io.BytesIO(keep[name])).convert("RGB"))
    src = imagefolder(tmp_path / "cifar10" / "raw")
    first_test = src[src["split"] == "test"].iloc[0]
    assert first_test["path"] == name
    np.testing.assert_array_equal(np.load(out.parent / "images.npy")[int(row["index"])], ref)
