"""finetail's dataset parsers checked against an independent implementation: torchvision's.

For every registered dataset that torchvision also reads (CIFAR-10/100, Flowers-102, Stanford
Cars, FGVC-Aircraft, Food-101, iNaturalist 2017, ImageNet), a small fixture in the official
archive layout (tests/data_builders.py) is placed in ``resources/<name>/`` and extracted by
finetail (:func:`finetail.datasets.fetch`, the registry's parser on the result), and
torchvision's dataset class reads the same extracted files (``download=False``; its expected
folder names arranged with symlinks, the files themselves untouched). Both must give the same
images (real paths; CIFAR: the pixel arrays in order), the same class for every image (up to
a consistent renaming where the two name classes differently) and the same split.

What torchvision checks that a fixture cannot pass is switched off, and only that: the md5 of
the real CIFAR batch files, of Flowers' ``.mat`` files and of the ImageNet archives.

Differences by design, encoded below (everything else is compared exactly):

- Flowers-102: ``setid.mat`` has three splits (trnid / valid / tstid). finetail folds trnid +
  valid into ``train`` (Cui et al., CVPR 2018; the registry's ``splits``); torchvision keeps
  ``train`` and ``val`` apart. The official files carry no class names: finetail names class
  k ``flower_{k:03d}`` (the 1-based label of ``imagelabels.mat``), torchvision uses its own
  list of English names in the same label order; the test checks the bijection is exactly
  "same label".
- iNaturalist 2017: torchvision's ``INaturalist(version="2017")`` reads no annotation file (its
  docstring: "This class does not require/use annotation files"): it lists every image under
  ``train_val_images/<super>/<species>/`` as one set, labelled by folder. finetail's split
  comes from ``train2017.json`` / ``val2017.json``; the test checks the union against
  torchvision and each image's split against the official json files read directly. Class
  names: torchvision's is the folder path ``<super>/<species>``, finetail's the species name
  (the category ``name`` of the json files).
- ImageNet: torchvision's ``val`` is finetail's ``test`` (the official val set is the papers'
  test set, registry ``splits``). Class names: the wnid on both sides (torchvision's
  ``classes`` are the words of ``meta.mat``; its ``wnids`` are compared).
- CIFAR: the existing ``build_cifar10`` / ``build_cifar100`` fixtures pickle ``bytes`` keys,
  which finetail accepts but torchvision cannot read (``entry["fine_labels"]`` KeyError); the
  official batches are python-2 pickles whose keys load as ``str`` under
  ``encoding="latin1"``. ``build_cifar*_official`` write them that way.

Result: on these fixtures finetail and torchvision agree everywhere apart from the differences
by design above; no parser needed a fix.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tvd  # a pinned dependency: no skip if it is missing

from data_builders import (
    BUILDERS,
    build_cifar10_official,
    build_cifar100_official,
    build_food101_official,
    sha256,
)
from finetail.datasets import fetch, get, prepare
from finetail.manifest import load_array_split


# ------------------------------------------------------------------------------ helpers


def _place(name: str, blobs: dict[str, bytes], resources: Path):
    """The blobs placed in ``resources/<name>/`` with their sha256 pinned: the registry entry."""
    raw = resources / name
    raw.mkdir(parents=True, exist_ok=True)
    for fn, b in blobs.items():
        (raw / fn).write_bytes(b)
    return get(name).with_checksums({fn: {"sha256": sha256(b), "md5": None} for fn, b in blobs.items()})


def finetail_side(name: str, blobs: dict[str, bytes], tmp_path: Path):
    """Extract as ``prepare`` does (fetch: verify, safe_extract, post_extract) and run the
    registry's parser on the result: ``(raw_dir, manifest DataFrame)``."""
    entry = _place(name, blobs, tmp_path / "resources")
    raw = fetch(entry, tmp_path / "resources", progress=False)
    return raw, entry.parse(raw)


def ours(raw: Path, df, key=None) -> dict:
    """finetail's manifest as ``{image key: (class name, split)}`` (key: the real path)."""
    key = key or (lambda p: os.path.realpath(p))
    keys = [key(raw / p) for p in df["path"]]
    assert len(set(keys)) == len(keys), "finetail lists an image twice"
    return dict(zip(keys, zip(df["class_name"], df["split"])))


def theirs(by_split: dict, name_of, key=None) -> dict:
    """torchvision's datasets (``{our split: [dataset, ...]}``, built with ``loader=str`` so
    each item is ``(path, target)``) as ``{image key: (class name, split)}``."""
    key = key or (lambda p: os.path.realpath(p))
    out = {}
    for split, datasets in by_split.items():
        for ds in datasets:
            for path, target in ds:
                k = key(path)
                assert k not in out, f"torchvision lists {k} twice"
                out[k] = (name_of(ds, target), split)
    return out


def assert_agree(a: dict, b: dict, same_names: bool = True) -> dict:
    """Same images, same split per image, and class names related by a bijection (equal
    names when ``same_names``). Returns the bijection ``{finetail name: torchvision name}``."""
    assert sorted(a) == sorted(b), f"only finetail: {sorted(set(a) - set(b))}; only torchvision: {sorted(set(b) - set(a))}"
    wrong_split = {k: (a[k][1], b[k][1]) for k in a if a[k][1] != b[k][1]}
    assert not wrong_split, f"splits differ (finetail, torchvision): {wrong_split}"
    pairs = {(a[k][0], b[k][0]) for k in a}
    forward = dict(pairs)
    assert len(forward) == len(pairs), f"a finetail class maps to several torchvision classes: {sorted(pairs)}"
    assert len({t for _, t in pairs}) == len(pairs), f"a torchvision class maps to several finetail classes: {sorted(pairs)}"
    if same_names:
        assert all(f == t for f, t in pairs), f"class names differ: {sorted(p for p in pairs if p[0] != p[1])}"
    return forward


def symlinks(root: Path, links: dict[str, Path]) -> Path:
    """``root/<name> -> target`` for each link (torchvision's folder names over our tree)."""
    for name, target in links.items():
        link = root / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(target).resolve(), target_is_directory=Path(target).is_dir())
    return root


def by_class_list(ds, target) -> str:
    return ds.classes[target]


# -------------------------------------------------------------------------------- CIFAR


def _no_md5_cifar(cls):
    """torchvision's CIFAR class without the md5 pins of the real batch files (parsing unchanged)."""
    return type(
        cls.__name__,
        (cls,),
        {
            "train_list": [[f, None] for f, _ in cls.train_list],
            "test_list": [[f, None] for f, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None},
        },
    )


@pytest.mark.parametrize(
    "name, builder, tv_cls, folder",
    [
        ("cifar10", build_cifar10_official, tvd.CIFAR10, "cifar-10-python"),
        ("cifar100", build_cifar100_official, tvd.CIFAR100, "cifar-100-python"),
    ],
)
def test_cifar(name, builder, tv_cls, folder, tmp_path):
    """Pixels (uint8 HWC), in order, and the fine label's class name of every image, per split;
    finetail's side is the whole ``prepare`` (parser + array store)."""
    blobs, expected = builder()
    entry = _place(name, blobs, tmp_path / "resources")
    manifest = prepare(entry, tmp_path / "resources", tmp_path / "out", progress=False)
    raw = tmp_path / "resources" / name
    tv = _no_md5_cifar(tv_cls)
    for split, train in (("train", True), ("test", False)):
        ds = tv(str(raw / folder), train=train, download=False)  # root holds cifar-*-batches-py / cifar-100-python
        mine = load_array_split(manifest, split)
        assert len(mine.images) == expected[split]
        np.testing.assert_array_equal(mine.images, ds.data)
        assert [mine.class_names[y] for y in mine.labels] == [ds.classes[y] for y in ds.targets]
        assert mine.class_names == ds.classes == expected["classes"]


def test_cifar_batches_load_as_the_official_python2_pickles():
    """The fixtures' batches behave as the real ones: str keys under latin1 (what torchvision
    and finetail read), bytes keys under encoding="bytes", and no default-encoding load."""
    import io
    import pickle
    import tarfile

    blobs, _ = build_cifar10_official()
    with tarfile.open(fileobj=io.BytesIO(blobs["cifar-10-python.tar.gz"])) as tf:
        raw = tf.extractfile("cifar-10-batches-py/data_batch_1").read()
    d = pickle.loads(raw, encoding="latin1")
    assert set(d) == {"batch_label", "labels", "data", "filenames"}
    assert d["data"].dtype == np.uint8 and d["data"].shape == (3, 3072)
    assert set(pickle.loads(raw, encoding="bytes")) == {b"batch_label", b"labels", b"data", b"filenames"}
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)
    assert b"numpy.core.multiarray" in raw


# ------------------------------------------------------------------------- Flowers-102


def test_flowers102(tmp_path):
    """trnid + valid -> train and tstid -> test (torchvision: train, val, test apart); class k
    is ``flower_{k:03d}`` in finetail and torchvision's k-th English name."""
    raw, df = finetail_side("flowers102", BUILDERS["flowers102"]()[0], tmp_path)
    root = symlinks(
        tmp_path / "tv",
        {
            "flowers-102/jpg": raw / "102flowers" / "jpg",
            "flowers-102/imagelabels.mat": raw / "imagelabels.mat",
            "flowers-102/setid.mat": raw / "setid.mat",
        },
    )
    tv = type("Flowers102", (tvd.Flowers102,), {"_file_dict": {k: (f, None) for k, (f, _) in tvd.Flowers102._file_dict.items()}})
    ds = {s: tv(root, split=s, download=False, loader=str) for s in ("train", "val", "test")}
    assert len(ds["train"]) == 3 and len(ds["val"]) == 3 and len(ds["test"]) == 4
    # known difference: finetail trains on trnid + valid (setid.mat), torchvision's val is apart
    mapping = assert_agree(ours(raw, df), theirs({"train": [ds["train"], ds["val"]], "test": [ds["test"]]}, by_class_list), same_names=False)
    # the official files have no names: the bijection must be "same imagelabels.mat label"
    assert mapping == {f"flower_{k + 1:03d}": tvd.Flowers102.classes[k] for k in range(3)}


# ------------------------------------------------------------------------ Stanford Cars


def test_stanford_cars(tmp_path):
    """The split layout: train labels from devkit/cars_train_annos.mat, test labels from
    cars_test_annos_withlabels.mat, names from devkit/cars_meta.mat (torchvision 0.29 reads
    exactly these under ``root/stanford_cars/``)."""
    raw, df = finetail_side("stanford_cars", BUILDERS["stanford_cars"]()[0], tmp_path)
    root = symlinks(
        tmp_path / "tv",
        {
            "stanford_cars/devkit": raw / "car_devkit" / "devkit",
            "stanford_cars/cars_train": raw / "cars_train" / "cars_train",
            "stanford_cars/cars_test": raw / "cars_test" / "cars_test",
            "stanford_cars/cars_test_annos_withlabels.mat": raw / "cars_test_annos_withlabels.mat",
        },
    )
    ds = {s: [tvd.StanfordCars(root, split=s, download=False, loader=str)] for s in ("train", "test")}
    assert_agree(ours(raw, df), theirs(ds, by_class_list))


# ------------------------------------------------------------------------ FGVC-Aircraft


def test_fgvc_aircraft(tmp_path):
    """``annotation_level="variant"``: images_variant_trainval.txt -> train, _test.txt -> test;
    variant names (with spaces and slashes: ``Cessna 172``, ``F/A-18``) on both sides."""
    raw, df = finetail_side("fgvc_aircraft", BUILDERS["fgvc_aircraft"]()[0], tmp_path)
    root = raw / "fgvc-aircraft-2013b"  # holds fgvc-aircraft-2013b/data, torchvision's layout
    ds = {
        "train": [tvd.FGVCAircraft(root, split="trainval", annotation_level="variant", download=False, loader=str)],
        "test": [tvd.FGVCAircraft(root, split="test", annotation_level="variant", download=False, loader=str)],
    }
    assert_agree(ours(raw, df), theirs(ds, by_class_list))
    # torchvision's train + val (images_variant_{train,val}.txt) is the same set as trainval
    parts = [tvd.FGVCAircraft(root, split=s, download=False, loader=str) for s in ("train", "val")]
    assert sorted(os.path.realpath(p) for d in parts for p, _ in d) == sorted(k for k, (_, s) in ours(raw, df).items() if s == "train")


# ----------------------------------------------------------------------------- Food-101


def test_food101(tmp_path):
    """finetail reads meta/{train,test}.txt and classes.txt, torchvision meta/{train,test}.json
    (classes sorted): the same images, classes and splits."""
    raw, df = finetail_side("food101", build_food101_official()[0], tmp_path)
    root = raw / "food-101"  # holds food-101/{images,meta}
    ds = {s: [tvd.Food101(root, split=s, download=False, loader=str)] for s in ("train", "test")}
    assert_agree(ours(raw, df), theirs(ds, by_class_list))
    assert len(df) == 16


# ---------------------------------------------------------------------- iNaturalist 2017


def test_inat2017(tmp_path):
    """torchvision lists ``train_val_images/<super>/<species>/*`` without splits; finetail's
    splits are checked against the official json files directly."""
    import json

    raw, df = finetail_side("inat2017", BUILDERS["inat2017"]()[0], tmp_path)
    root = symlinks(tmp_path / "tv", {"2017": raw / "train_val_images" / "train_val_images"})
    ds = tvd.INaturalist(root, version="2017", target_type="full", download=False, loader=str)
    mine = ours(raw, df)
    # known difference: no split in torchvision's 2017 reader -> compare the union, labelled
    # by folder, and take the split from train2017.json / val2017.json
    official = {}
    for fname, split in (("train2017.json", "train"), ("val2017.json", "test")):
        for im in json.loads((raw / "train_val2017" / fname).read_text())["images"]:
            official[os.path.realpath(raw / "train_val_images" / im["file_name"])] = split
    tv_view = {k: (c, official.get(k, "not in the json files")) for k, (c, _) in theirs({"-": [ds]}, lambda d, t: d.category_name("full", t)).items()}
    mapping = assert_agree(mine, tv_view, same_names=False)
    # torchvision's class is the folder <super>/<species>, finetail's the species name (or
    # <super>/<species> where a species name repeats across supercategories)
    assert all(t == f if "/" in f else t.split(os.sep, 1)[1] == f for f, t in mapping.items()), mapping


# ----------------------------------------------------------------------------- ImageNet


def _file_key(path) -> tuple[str, str]:
    """ImageNet images in two different extractions: file name + content digest."""
    return os.path.basename(path), hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_imagenet(tmp_path, monkeypatch):
    """torchvision extracts the three official archives itself (devkit -> meta.bin, train ->
    per-class inner tars, val -> moved into wnid folders by the ground truth); finetail's
    extraction of the same archives must give the same images, wnids and splits. Then
    finetail's parser reads torchvision's extracted tree (the ``train/`` + ``val/<wnid>/``
    layout a user may place by hand) and must agree again, path for path."""
    from torchvision.datasets import imagenet

    blobs, expected = BUILDERS["imagenet"]()
    raw, df = finetail_side("imagenet", blobs, tmp_path)
    root = symlinks(tmp_path / "tv", {fn: raw / fn for fn in blobs})
    # only the md5 pins of the real archives are replaced (by the fixtures'); parsing unchanged
    monkeypatch.setattr(
        imagenet, "ARCHIVE_META", {k: (fn, hashlib.md5(blobs[fn]).hexdigest()) for k, (fn, _) in imagenet.ARCHIVE_META.items()}
    )
    ds = {s: [tvd.ImageNet(root, split=tv_split, loader=str)] for s, tv_split in (("train", "train"), ("test", "val"))}
    wnid = lambda d, t: d.wnids[t]  # noqa: E731
    assert_agree(ours(raw, df, key=_file_key), theirs(ds, wnid, key=_file_key))
    assert ds["train"][0].wnids == expected["classes"]
    # finetail on torchvision's extracted tree (train/<wnid>/, val/<wnid>/): same real paths
    from finetail.datasets.parsers import parse_imagenet

    assert_agree(ours(root, parse_imagenet(root)), theirs(ds, wnid))
