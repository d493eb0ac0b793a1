"""Parsers: one function per dataset, from its extracted layout to a manifest table.

Every parser takes ``raw_dir`` (``resources/<dataset>/``: the downloaded files, each archive
extracted into a folder named after it without its extension, e.g. ``CUB_200_2011.tgz`` ->
``CUB_200_2011/``) and returns a DataFrame with columns

- ``path``: the image, relative to ``raw_dir`` (for CIFAR: the pickled batch file),
- ``row`` (CIFAR only): the image's row in that batch,
- ``label`` (int64, 0..C-1), ``class_name`` (str, a stable id), ``split`` (train/test),
- ``width``, ``height`` where the annotation files give them for free.

torchvision's dataset classes are not used: each yields one split at a time without the
image paths in a table, and several (ImageNet, Stanford Cars) insist on their own folder
names; reading the official annotation files directly is a few lines each.

Splits are the official ones; where a dataset has a validation split that the papers train
on (Flowers-102, FGVC-Aircraft), it is folded into ``train`` and documented in the registry.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "archive_folder",
    "parse_cifar10",
    "parse_cifar100",
    "parse_cub200",
    "parse_fgvc_aircraft",
    "parse_flowers102",
    "parse_food101",
    "parse_imagefolder",
    "parse_imagenet",
    "parse_inat2017",
    "parse_inat2017_cvpr18",
    "parse_nabirds",
    "parse_stanford_cars",
    "parse_stanford_dogs",
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def archive_folder(filename: str) -> str:
    """The folder an archive is extracted into: its name without the archive extension."""
    for ext in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".tar", ".zip"):
        if filename.lower().endswith(ext):
            return filename[: -len(ext)]
    return filename


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path}: the extracted layout is not the expected one")
    return path


def _frame(paths, labels, class_names_by_label, split, **extra) -> pd.DataFrame:
    labels = np.asarray(labels, dtype=np.int64)
    names = np.asarray(class_names_by_label, dtype=object)
    df = pd.DataFrame(
        {
            "path": np.asarray(paths, dtype=object),
            "label": labels,
            "class_name": names[labels] if len(labels) else np.array([], dtype=object),
            "split": np.asarray(split, dtype=object),
        }
    )
    for k, v in extra.items():
        df[k] = v
    return df


def _relabel_by_name(df: pd.DataFrame) -> pd.DataFrame:
    """Labels 0..C-1 in sorted class_name order."""
    names = sorted(df["class_name"].unique())
    index = {n: i for i, n in enumerate(names)}
    df = df.copy()
    df["label"] = df["class_name"].map(index).astype(np.int64)
    return df


# ------------------------------------------------------------------------------ CIFAR


def _unpickle(path: Path) -> dict:
    from ..errors import UserError

    with open(_require(path, "CIFAR batch"), "rb") as f:
        try:
            d = pickle.load(f, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, IndexError) as e:
            raise UserError(f"{path}: not a readable CIFAR batch (truncated or corrupt: {e or type(e).__name__})") from e
    if not isinstance(d, dict):
        raise UserError(f"{path}: not a CIFAR batch (holds a {type(d).__name__}, not a dict)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _parse_cifar(base: Path, rel_base: str, train_files, test_files, meta_file, names_key, labels_key) -> pd.DataFrame:
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(base / meta_file)[names_key]]
    frames = []
    for split, files in (("train", train_files), ("test", test_files)):
        for fname in files:
            labels = np.asarray(_unpickle(base / fname)[labels_key], dtype=np.int64)
            df = _frame([f"{rel_base}/{fname}"] * len(labels), labels, class_names, [split] * len(labels))
            df["row"] = np.arange(len(labels), dtype=np.int64)
            frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out["width"], out["height"] = 32, 32
    return out


def parse_cifar10(raw_dir: str | Path) -> pd.DataFrame:
    """CIFAR-10 python batches: ``cifar-10-python/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``.

    50,000 train / 10,000 test; class names from ``batches.meta`` (``airplane`` ...).
    """
    rel = "cifar-10-python/cifar-10-batches-py"
    return _parse_cifar(
        Path(raw_dir) / rel, rel, [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "label_names", "labels"
    )


def parse_cifar100(raw_dir: str | Path) -> pd.DataFrame:
    """CIFAR-100 python batches: ``cifar-100-python/cifar-100-python/{train,test,meta}``, fine labels."""
    rel = "cifar-100-python/cifar-100-python"
    return _parse_cifar(Path(raw_dir) / rel, rel, ["train"], ["test"], "meta", "fine_label_names", "fine_labels")


# ---------------------------------------------------------------------------- ImageNet


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _first_existing(root: Path, candidates: tuple[str, ...], what: str) -> Path:
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    raise FileNotFoundError(f"{what} not found under {root} (looked for {', '.join(candidates)})")


def _imagenet_val_truth(root: Path) -> dict[str, str]:
    """Map val file name -> wnid from the devkit (meta.mat + ILSVRC2012_validation_ground_truth.txt)."""
    from scipy.io import loadmat

    data = _require(root / "ILSVRC2012_devkit_t12" / "ILSVRC2012_devkit_t12" / "data", "ImageNet devkit")
    synsets = loadmat(_require(data / "meta.mat", "devkit meta.mat"), squeeze_me=True)["synsets"]
    id_to_wnid = {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"]) if int(i) <= 1000}
    ids = (data / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    return {f"ILSVRC2012_val_{k + 1:08d}.JPEG": id_to_wnid[int(i)] for k, i in enumerate(ids)}


def parse_imagenet(raw_dir: str | Path) -> pd.DataFrame:
    """ILSVRC-2012: ``train/<wnid>/*.JPEG`` and the official val set as ``test``.

    The train folder is ``ILSVRC2012_img_train/`` (from the archive, whose per-class inner
    tars ``prepare`` unpacks) or ``train/`` (placed by hand). Val is either
    ``val/<wnid>/*.JPEG`` or the flat ``ILSVRC2012_img_val/`` folder labelled by the devkit's
    ``ILSVRC2012_validation_ground_truth.txt`` (ILSVRC2012_ID -> WNID via ``meta.mat``).
    ``class_name`` is the wnid; labels follow sorted wnids (the usual ImageFolder order).
    """
    root = Path(raw_dir)
    train = _first_existing(root, ("ILSVRC2012_img_train", "train"), "ImageNet train folder")
    rows = []
    for cls in sorted(p for p in train.iterdir() if p.is_dir()):
        rows += [(str(p.relative_to(root)), cls.name, "train") for p in _list_images(cls)]
    val = _first_existing(root, ("ILSVRC2012_img_val", "val"), "ImageNet val folder")
    subdirs = sorted(p for p in val.iterdir() if p.is_dir())
    if subdirs:
        for cls in subdirs:
            rows += [(str(p.relative_to(root)), cls.name, "test") for p in _list_images(cls)]
    else:
        truth = _imagenet_val_truth(root)
        for p in _list_images(val):
            if p.name not in truth:
                raise ValueError(f"{p.name} has no ground-truth label in the devkit")
            rows.append((str(p.relative_to(root)), truth[p.name], "test"))
    df = pd.DataFrame(rows, columns=["path", "class_name", "split"])
    df["label"] = 0
    return _relabel_by_name(df)[["path", "label", "class_name", "split"]]


# --------------------------------------------------------------------------- iNat 2017


def _inat_frame(ann_file: Path, image_prefix: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    d = json.loads(_require(ann_file, "iNat annotation file").read_text())
    images = pd.DataFrame(d["images"])[["id", "file_name", "width", "height"]]
    anns = pd.DataFrame(d["annotations"])[["image_id", "category_id"]]
    df = images.merge(anns, left_on="id", right_on="image_id", how="inner", validate="one_to_one")
    df["path"] = image_prefix + df["file_name"]
    return df, pd.DataFrame(d["categories"])


def _inat2017(raw_dir: str | Path, minival: set[int] | None) -> pd.DataFrame:
    root = Path(raw_dir)
    ann = root / "train_val2017"
    if not (ann / "train2017.json").exists() and (ann / "train_val2017" / "train2017.json").exists():
        ann = ann / "train_val2017"  # a zip that wraps its files in a folder
    train, cats = _inat_frame(ann / "train2017.json", "train_val_images/")
    val, _ = _inat_frame(ann / "val2017.json", "train_val_images/")
    train["split"] = "train"
    if minival is None:
        val["split"] = "test"
    else:
        unknown = minival - set(val["id"].tolist())
        if unknown:
            raise ValueError(f"{len(unknown)} minival ids are not iNat2017 val images (e.g. {sorted(unknown)[:3]})")
        val["split"] = np.where(val["id"].isin(minival), "test", "train")
    df = pd.concat([train, val], ignore_index=True)
    cats = cats.sort_values("id").reset_index(drop=True)
    name = cats["name"].astype(str)
    dup = name.duplicated(keep=False)
    name = name.where(~dup, cats["supercategory"].astype(str) + "/" + name)  # names are the stable ids; keep them unique
    label_of = {int(c): i for i, c in enumerate(cats["id"])}
    labels = df["category_id"].map(label_of).astype(np.int64).to_numpy()
    return _frame(df["path"], labels, name.tolist(), df["split"], width=df["width"].to_numpy(), height=df["height"].to_numpy())


def parse_inat2017(raw_dir: str | Path) -> pd.DataFrame:
    """iNaturalist 2017, official split: ``train2017.json`` -> train, ``val2017.json`` -> test.

    Images ``train_val_images/train_val_images/<super>/<species>/<id>.jpg`` (the annotation
    ``file_name`` is relative to the archive's folder); annotations
    ``train_val2017/{train,val}2017.json`` (COCO style). Labels follow category ids; the
    class name is the species name (prefixed by its supercategory if a name repeats).
    """
    return _inat2017(raw_dir, None)


def parse_inat2017_cvpr18(raw_dir: str | Path) -> pd.DataFrame:
    """iNaturalist 2017 as split in Cui et al. (CVPR 2018): train + val - minival -> train, minival -> test.

    The minival list is ``raw_dir/minival2017.txt``: one val image id (the ``id`` in
    ``val2017.json``) or ``file_name`` per line.
    """
    root = Path(raw_dir)
    lines = [s.strip() for s in _require(root / "minival2017.txt", "minival list").read_text().splitlines() if s.strip()]
    if lines and not lines[0].isdigit():
        ann = root / "train_val2017"
        if not (ann / "val2017.json").exists():
            ann = ann / "train_val2017"
        val = json.loads(_require(ann / "val2017.json", "val2017.json").read_text())["images"]
        by_name = {im["file_name"]: int(im["id"]) for im in val}
        missing = [s for s in lines if s not in by_name]
        if missing:
            raise ValueError(f"{len(missing)} minival names are not iNat2017 val images (e.g. {missing[:3]})")
        ids = {by_name[s] for s in lines}
    else:
        ids = {int(s) for s in lines}
    return _inat2017(root, ids)


# ------------------------------------------------------------------ CUB-200 and NABirds


def _read_table(path: Path, names: list[str]) -> pd.DataFrame:
    """Whitespace-separated ``id value`` files (the value may contain spaces)."""
    rows = [line.split(" ", len(names) - 1) for line in _require(path, path.name).read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows, columns=names)


def _cub_like(base: Path, rel_base: str, class_name) -> pd.DataFrame:
    images = _read_table(base / "images.txt", ["image_id", "file"])
    labels = _read_table(base / "image_class_labels.txt", ["image_id", "class_id"])
    split = _read_table(base / "train_test_split.txt", ["image_id", "is_train"])
    classes = _read_table(base / "classes.txt", ["class_id", "name"])
    df = images.merge(labels, on="image_id", validate="one_to_one").merge(split, on="image_id", validate="one_to_one")
    if len(df) != len(images):
        raise ValueError(f"{base}: images.txt, image_class_labels.txt and train_test_split.txt do not list the same ids")
    used = sorted({int(c) for c in df["class_id"]})  # NABirds: only leaf classes have images
    label_of = {c: i for i, c in enumerate(used)}
    names = dict(zip(classes["class_id"].astype(int), classes["name"].str.strip()))
    class_names = [class_name(c, names[c]) for c in used]
    # inner merges keep images.txt's order; ids are integers (CUB) or UUIDs (NABirds)
    return _frame(
        (rel_base + "/images/" + df["file"].str.strip()).tolist(),
        df["class_id"].astype(int).map(label_of).to_numpy(),
        class_names,
        np.where(df["is_train"].str.strip() == "1", "train", "test"),
    )


def parse_cub200(raw_dir: str | Path) -> pd.DataFrame:
    """CUB-200-2011: ``CUB_200_2011/CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,classes.txt,images/}``.

    5,994 train / 5,794 test; class names as in ``classes.txt`` (``001.Black_footed_Albatross``).
    """
    rel = "CUB_200_2011/CUB_200_2011"
    return _cub_like(Path(raw_dir) / rel, rel, lambda cid, name: name)


def parse_nabirds(raw_dir: str | Path) -> pd.DataFrame:
    """NABirds: ``nabirds/nabirds/{images.txt,image_class_labels.txt,train_test_split.txt,classes.txt,images/}``.

    555 leaf classes (those with images; ``classes.txt`` also lists the hierarchy's inner
    nodes), 23,929 train / 24,633 test; labels follow class ids, class names are
    ``<id, 4 digits>.<name>`` (the id is the folder name under ``images/``).
    """
    rel = "nabirds/nabirds"
    return _cub_like(Path(raw_dir) / rel, rel, lambda cid, name: f"{cid:04d}.{name}")


# ---------------------------------------------------------------------- Stanford Dogs


def _mat_strings(values) -> list[str]:
    return [str(np.asarray(v).ravel()[0]) if np.ndim(v) else str(v) for v in np.asarray(values, dtype=object).ravel()]


def parse_stanford_dogs(raw_dir: str | Path) -> pd.DataFrame:
    """Stanford Dogs: ``images/Images/<wnid>-<breed>/*.jpg`` + ``lists/{train,test}_list.mat``.

    12,000 train / 8,580 test; class name = the folder (``n02085620-Chihuahua``), label =
    the lists' 1-based ``labels`` minus one (the sorted folder order).
    """
    from scipy.io import loadmat

    root = Path(raw_dir)
    frames = []
    for split in ("train", "test"):
        m = loadmat(_require(root / "lists" / f"{split}_list.mat", f"{split}_list.mat"), squeeze_me=True)
        files = _mat_strings(m["file_list"])
        labels = np.asarray(m["labels"], dtype=np.int64).ravel() - 1
        frames.append(pd.DataFrame({"file": files, "label": labels, "split": split}))
    df = pd.concat(frames, ignore_index=True)
    df["class_name"] = df["file"].str.split("/").str[0]
    check = df.groupby("label")["class_name"].nunique()
    if (check != 1).any():
        raise ValueError("Stanford Dogs lists: a label maps to several folders")
    df["path"] = "images/Images/" + df["file"]
    return df[["path", "label", "class_name", "split"]]


# --------------------------------------------------------------------------- Flowers


def parse_flowers102(raw_dir: str | Path) -> pd.DataFrame:
    """Oxford Flowers-102: ``102flowers/jpg/image_NNNNN.jpg`` + ``imagelabels.mat`` + ``setid.mat``.

    Official split trnid (1,020) / valid (1,020) / tstid (6,149); train **and** val become
    ``train`` (2,040), as in Cui et al. (CVPR 2018) and the reference table; ``tstid`` is
    ``test``. The files carry no class names: ``class_name`` is ``flower_NNN`` (1-based
    official label).
    """
    from scipy.io import loadmat

    root = Path(raw_dir)
    labels = np.asarray(loadmat(_require(root / "imagelabels.mat", "imagelabels.mat"))["labels"]).ravel().astype(np.int64)
    setid = loadmat(_require(root / "setid.mat", "setid.mat"))
    rows = []
    for key, split in (("trnid", "train"), ("valid", "train"), ("tstid", "test")):
        for i in np.asarray(setid[key]).ravel().astype(int):
            rows.append((f"102flowers/jpg/image_{i:05d}.jpg", int(labels[i - 1]) - 1, split))
    df = pd.DataFrame(rows, columns=["path", "label", "split"])
    names = [f"flower_{k + 1:03d}" for k in range(int(labels.max()))]
    return _frame(df["path"], df["label"], names, df["split"])


# ---------------------------------------------------------------------- Stanford Cars


def _mat_records(arr) -> list[dict]:
    arr = np.atleast_1d(arr)
    return [{k: a[k] for k in arr.dtype.names} for a in arr]


def parse_stanford_cars(raw_dir: str | Path) -> pd.DataFrame:
    """Stanford Cars (196 classes, 8,144 train / 8,041 test), in either official layout.

    - ``cars_train/cars_train/*.jpg``, ``cars_test/cars_test/*.jpg``,
      ``car_devkit/devkit/{cars_meta.mat,cars_train_annos.mat}`` and
      ``cars_test_annos_withlabels.mat`` (the split layout);
    - or ``car_ims/car_ims/*.jpg`` + ``cars_annos.mat`` (``relative_im_path``, ``class``,
      ``test``) (the all-in-one layout).

    Class names come from ``class_names`` in the meta file (``AM General Hummer SUV 2000``).
    """
    from scipy.io import loadmat

    root = Path(raw_dir)
    if (root / "cars_annos.mat").exists():
        m = loadmat(root / "cars_annos.mat", squeeze_me=True)
        names = _mat_strings(m["class_names"])
        recs = _mat_records(m["annotations"])
        prefix = "car_ims/" if (root / "car_ims" / "car_ims").is_dir() else ""  # archive folder, or placed by hand
        paths = [prefix + str(r["relative_im_path"]) for r in recs]
        labels = [int(r["class"]) - 1 for r in recs]
        split = ["test" if int(r["test"]) else "train" for r in recs]
        return _frame(paths, labels, names, split)
    devkit = root / "car_devkit" / "devkit"
    names = _mat_strings(loadmat(_require(devkit / "cars_meta.mat", "cars_meta.mat"), squeeze_me=True)["class_names"])
    paths, labels, split = [], [], []
    for name, mat, folder in (
        ("train", devkit / "cars_train_annos.mat", "cars_train/cars_train"),
        ("test", root / "cars_test_annos_withlabels.mat", "cars_test/cars_test"),
    ):
        for r in _mat_records(loadmat(_require(mat, mat.name), squeeze_me=True)["annotations"]):
            paths.append(f"{folder}/{r['fname']}")
            labels.append(int(r["class"]) - 1)
            split.append(name)
    return _frame(paths, labels, names, split)


# ---------------------------------------------------------------------- FGVC Aircraft


def parse_fgvc_aircraft(raw_dir: str | Path) -> pd.DataFrame:
    """FGVC-Aircraft 2013b, 100 variants: ``fgvc-aircraft-2013b/fgvc-aircraft-2013b/data/``.

    ``images_variant_trainval.txt`` -> train (6,667), ``images_variant_test.txt`` -> test
    (3,333), as in the paper. Labels follow ``variants.txt`` order; class names are the
    variant names (``707-320``). Images keep their 20-pixel copyright banner.
    """
    rel = "fgvc-aircraft-2013b/fgvc-aircraft-2013b/data"
    data = Path(raw_dir) / rel
    variants = [s.strip() for s in _require(data / "variants.txt", "variants.txt").read_text().splitlines() if s.strip()]
    label_of = {v: i for i, v in enumerate(variants)}
    rows = []
    for fname, split in (("images_variant_trainval.txt", "train"), ("images_variant_test.txt", "test")):
        for line in _require(data / fname, fname).read_text().splitlines():
            if line.strip():
                image, variant = line.strip().split(" ", 1)
                rows.append((f"{rel}/images/{image}.jpg", label_of[variant], split))
    df = pd.DataFrame(rows, columns=["path", "label", "split"])
    return _frame(df["path"], df["label"], variants, df["split"])


# --------------------------------------------------------------------------- Food-101


def parse_food101(raw_dir: str | Path) -> pd.DataFrame:
    """Food-101: ``food-101/food-101/{images/<class>/<id>.jpg, meta/{classes,train,test}.txt}``.

    75,750 train / 25,250 test; labels follow ``meta/classes.txt``.
    """
    rel = "food-101/food-101"
    base = Path(raw_dir) / rel
    classes = [s.strip() for s in _require(base / "meta" / "classes.txt", "classes.txt").read_text().splitlines() if s.strip()]
    label_of = {c: i for i, c in enumerate(classes)}
    rows = []
    for split in ("train", "test"):
        for line in _require(base / "meta" / f"{split}.txt", f"{split}.txt").read_text().splitlines():
            if line.strip():
                cls = line.strip().split("/", 1)[0]
                rows.append((f"{rel}/images/{line.strip()}.jpg", label_of[cls], split))
    df = pd.DataFrame(rows, columns=["path", "label", "split"])
    return _frame(df["path"], df["label"], classes, df["split"])


# ------------------------------------------------------------------------ ImageFolder


_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}


def _check_csv_paths(paths: pd.Series, source: Path) -> None:
    """Every CSV path is given, and a relative one stays inside the CSV's folder once
    normalised (``../x.jpg`` and ``a/../../x.jpg`` are refused; absolute paths are allowed)."""
    from ..errors import UserError

    for i, p in enumerate(paths, 1):
        if not isinstance(p, str) or not p.strip():
            raise UserError(f"{source}: row {i} has no path")
        if Path(p).is_absolute():
            continue
        if Path(os.path.normpath(p)).parts[:1] == ("..",):
            raise UserError(f"{source}: row {i}: path {p!r} leaves the CSV's folder ('..'); "
                            "give a path inside it, or an absolute path")


def parse_imagefolder(source: str | Path) -> pd.DataFrame:
    """A user's own data: a ``train/<class>/*`` + ``test/<class>/*`` (+ ``val/``) tree, or a CSV.

    The CSV has columns ``path`` (relative to the CSV's folder, or absolute; a relative path
    that leaves the folder through ``..`` is refused), ``split`` and
    ``class_name`` and/or ``label``. Labels are assigned in sorted class-name order (a CSV
    that gives only ``label`` keeps it, with ``class_name`` = the label as text). Paths in
    the result are relative to the tree (or to the CSV's folder).

    Parameters
    ----------
    source : str or Path
        The tree's root folder, or the CSV file.

    Returns
    -------
    pandas.DataFrame
        ``path``, ``label``, ``class_name``, ``split``.
    """
    source = Path(source)
    if source.is_file():
        df = pd.read_csv(source, dtype={"path": str, "split": str})
        if "path" not in df.columns or "split" not in df.columns:
            raise ValueError(f"{source}: a CSV manifest needs 'path' and 'split' columns (got {list(df.columns)})")
        if "class_name" not in df.columns and "label" not in df.columns:
            raise ValueError(f"{source}: a CSV manifest needs a 'class_name' or a 'label' column")
        _check_csv_paths(df["path"], source)
        df["split"] = df["split"].str.strip().str.lower().map(lambda s: _SPLIT_ALIASES.get(s, s))
        bad = sorted(set(df["split"]) - {"train", "test", "val"})
        if bad:
            raise ValueError(f"{source}: unknown split values {bad} (expected train, test, val)")
        if "class_name" in df.columns:
            df["class_name"] = df["class_name"].astype(str)
            df = _relabel_by_name(df)
        else:
            df["label"] = df["label"].astype(np.int64)
            df["class_name"] = df["label"].astype(str)
        return df[["path", "label", "class_name", "split"]].reset_index(drop=True)
    if not source.is_dir():
        raise FileNotFoundError(f"image folder {source} does not exist")
    rows = []
    for split_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        split = _SPLIT_ALIASES.get(split_dir.name.lower())
        if split is None:
            continue
        for cls in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            rows += [(str(p.relative_to(source)), cls.name, split) for p in _list_images(cls)]
    if not rows:
        raise ValueError(f"{source}: no images under train/<class>/ or test/<class>/")
    df = pd.DataFrame(rows, columns=["path", "class_name", "split"])
    df["label"] = 0
    return _relabel_by_name(df)[["path", "label", "class_name", "split"]]
