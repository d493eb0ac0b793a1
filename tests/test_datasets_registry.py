"""Every registered dataset, end to end: a tiny archive in its real layout, served over local HTTP
(or placed by hand for manual datasets), downloaded, verified, extracted and parsed into a manifest."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from data_builders import BUILDERS, FileServer, serve_entry, sha256
from finetail.datasets import (
    REGISTRY,
    ChecksumError,
    ManualDownloadRequired,
    get,
    names,
    prepare,
)
from finetail.fileio import file_sha256
from finetail.manifest import FILE_SHA256, load_array_split, read_manifest

DOWNLOADABLE = ["cifar10", "cifar100", "inat2017", "cub200", "stanford_dogs", "flowers102", "stanford_cars", "fgvc_aircraft", "food101"]
MANUAL = ["imagenet", "nabirds"]


def check_manifest(path, expected, kind):
    df = read_manifest(path)
    counts = df["split"].value_counts().to_dict()
    assert counts == {"train": expected["train"], "test": expected["test"]}
    by_label = df.groupby("label")["class_name"].nunique()
    assert (by_label == 1).all(), "a label maps to several class names"
    names_by_label = df.groupby("label")["class_name"].first().sort_index()
    assert list(names_by_label.index) == list(range(len(expected["classes"])))
    assert list(names_by_label) == expected["classes"]
    if kind == "array":
        assert {"store", "index"} <= set(df.columns)
        tr = load_array_split(path, "train")
        assert tr.images.dtype == np.uint8 and tr.images.shape == (expected["train"], 32, 32, 3)
        assert tr.class_names == expected["classes"]
    else:
        assert "path" in df.columns
        for p, digest in zip(df["path"], df[FILE_SHA256], strict=True):  # hashed once, at prepare time
            assert not p.startswith("/")
            assert (path.parent / p).is_file(), p
            assert digest == file_sha256(path.parent / p), p
    return df


@pytest.fixture
def server():
    with FileServer() as s:
        yield s


def test_registry_covers_the_papers():
    for name in DOWNLOADABLE + MANUAL + ["inat2017_cvpr18"]:
        e = get(name)
        assert e.files and e.homepage and e.license and e.splits
        assert e.kind == ("array" if name.startswith("cifar") else "files")
    assert get("imagenet").manual and get("nabirds").manual and not get("cub200").manual
    assert set(names()) == set(REGISTRY)
    with pytest.raises(ValueError, match="unknown dataset 'cub201'.*cub200"):
        prepare("cub201", "r", "o")


def test_known_checksums_are_the_published_ones():
    md5 = {f.filename: f.md5 for e in REGISTRY.values() for f in e.files}
    assert md5["cifar-10-python.tar.gz"] == "c58f30108f718f92721af3b95e74349a"
    assert md5["cifar-100-python.tar.gz"] == "eb9058c3a382ffc7106e4002c42a8d85"
    assert md5["CUB_200_2011.tgz"] == "97eceeb196236b17998738112f37df78"
    assert md5["food-101.tar.gz"] == "85eeb15f3717b99a5da872d97d918f87"
    for e in REGISTRY.values():
        for f in e.files:
            for digest, n in ((f.md5, 32), (f.sha256, 64)):
                assert digest is None or (len(digest) == n and int(digest, 16) >= 0)


@pytest.mark.parametrize("name", DOWNLOADABLE)
def test_download_extract_parse(name, server, tmp_path):
    blobs, expected = BUILDERS[name]()
    entry = serve_entry(server, get(name), blobs)
    out = tmp_path / "out" / name
    manifest = prepare(entry, tmp_path / "resources", out, base_url=server.url, progress=False, backoff=0)
    assert manifest == out / "manifest.parquet"
    df = check_manifest(manifest, expected, entry.kind)
    assert server.hits() == len(entry.files)
    assert (out / "classes.csv").exists() and (out / "source.json").exists()
    for f in entry.files:  # downloads are complete and verified; no .part left
        assert (tmp_path / "resources" / name / f.filename).is_file()
        assert not (tmp_path / "resources" / name / (f.filename + ".part")).exists()
    if name == "inat2017":
        assert {"width", "height"} <= set(df.columns)
    # idempotent: a second prepare touches no network
    before = server.hits()
    assert prepare(entry, tmp_path / "resources", out, base_url=server.url, progress=False) == manifest
    assert server.hits() == before


def test_second_prepare_into_a_new_folder_needs_no_network(server, tmp_path):
    blobs, expected = BUILDERS["cub200"]()
    entry = serve_entry(server, get("cub200"), blobs)
    prepare(entry, tmp_path / "res", tmp_path / "a", base_url=server.url, progress=False)
    hits = server.hits()
    check_manifest(prepare(entry, tmp_path / "res", tmp_path / "b", base_url=server.url, progress=False), expected, "files")
    assert server.hits() == hits


def test_corrupted_archive_leaves_nothing(server, tmp_path):
    blobs, _ = BUILDERS["food101"]()
    entry = serve_entry(server, get("food101"), blobs)
    good = blobs["food-101.tar.gz"]
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    server.files["/cvl/food-101.tar.gz"] = bytes(bad)
    res, out = tmp_path / "resources", tmp_path / "out"
    with pytest.raises(ChecksumError) as info:
        prepare(entry, res, out, base_url=server.url, progress=False, backoff=0)
    msg = str(info.value)
    assert "food-101.tar.gz" in msg and sha256(good) in msg and sha256(bytes(bad)) in msg
    raw = res / "food101"
    assert not (raw / "food-101.tar.gz").exists()
    assert not (raw / "food-101.tar.gz.part").exists()
    assert not (raw / "food-101").exists()
    assert not out.exists()


def test_published_md5_mismatch_is_reported(server, tmp_path):
    """With the registry's real md5, our tiny archive must fail: the real checksum is checked."""
    blobs, _ = BUILDERS["cifar10"]()
    serve_entry(server, get("cifar10"), blobs)
    with pytest.raises(ChecksumError, match="md5 mismatch.*c58f30108f718f92721af3b95e74349a"):
        prepare("cifar10", tmp_path / "res", tmp_path / "out", base_url=server.url, progress=False)
    assert not any((tmp_path / "res" / "cifar10").iterdir())


@pytest.mark.parametrize("name", MANUAL)
def test_manual_dataset(name, tmp_path):
    blobs, expected = BUILDERS[name]()
    pins = {fn: {"sha256": sha256(b), "md5": None} for fn, b in blobs.items()}
    entry = get(name).with_checksums(pins)
    res, out = tmp_path / "resources", tmp_path / "out"
    with pytest.raises(ManualDownloadRequired) as info:
        prepare(entry, res, out, progress=False)
    msg = str(info.value)
    for fn in blobs:
        assert fn in msg and f"resources/{name}/{fn}" in msg
        assert str(res / name / fn) in msg
    assert entry.files[0].url in msg  # where to get it
    assert isinstance(info.value, FileNotFoundError)
    # a wrong file placed by hand fails verification
    first = next(iter(blobs))
    (res / name).mkdir(parents=True, exist_ok=True)
    for fn, b in blobs.items():
        (res / name / fn).write_bytes(b if fn != first else b + b"junk")
    with pytest.raises(ChecksumError, match=first):
        prepare(entry, res, out, progress=False)
    (res / name / first).write_bytes(blobs[first])
    df = check_manifest(prepare(entry, res, out, progress=False), expected, "files")
    if name == "imagenet":
        test = df[df["split"] == "test"]
        assert test["class_name"].value_counts().to_dict() == expected["test_counts"]
        assert not list((res / name / "ILSVRC2012_img_train").glob("*.tar"))  # inner tars unpacked


def test_imagenet_extracted_layout_placed_by_hand(tmp_path):
    raw = tmp_path / "resources" / "imagenet"
    from data_builders import jpeg

    for split, n in (("train", 3), ("val", 2)):
        for w in ("n01440764", "n01443537"):
            (raw / split / w).mkdir(parents=True)
            for k in range(n):
                (raw / split / w / f"{w}_{k}.JPEG").write_bytes(jpeg(k))
    df = check_manifest(
        prepare("imagenet", tmp_path / "resources", tmp_path / "out", progress=False),
        {"train": 6, "test": 4, "classes": ["n01440764", "n01443537"]},
        "files",
    )
    assert df["path"].str.startswith("../resources/imagenet/").all()


def test_inat2017_cvpr18_minival(server, tmp_path):
    blobs, expected = BUILDERS["inat2017"]()
    raw = tmp_path / "resources" / "inat2017_cvpr18"
    entry = get("inat2017_cvpr18").with_checksums({fn: {"sha256": sha256(b), "md5": None} for fn, b in blobs.items()})
    with pytest.raises(ManualDownloadRequired, match="minival2017.txt"):
        prepare(entry, tmp_path / "resources", tmp_path / "out", progress=False)
    for fn, b in blobs.items():
        (raw / fn).write_bytes(b)
    minival = expected["val_ids"][:2]
    (raw / "minival2017.txt").write_text("".join(f"{i}\n" for i in minival))
    df = read_manifest(prepare(entry, tmp_path / "resources", tmp_path / "out", progress=False))
    n_val = len(expected["val_ids"])
    assert (df["split"] == "test").sum() == 2
    assert (df["split"] == "train").sum() == expected["train"] + n_val - 2


def test_stanford_cars_all_in_one_layout(tmp_path):
    from data_builders import jpeg, mat, struct

    raw = tmp_path / "resources" / "stanford_cars"
    (raw / "car_ims").mkdir(parents=True)
    recs = []
    for i in range(1, 7):
        (raw / "car_ims" / f"{i:06d}.jpg").write_bytes(jpeg(i))
        recs.append({"relative_im_path": f"car_ims/{i:06d}.jpg", "bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 5, "bbox_y2": 5, "class": (i - 1) % 2 + 1, "test": int(i > 4)})
    names_ = np.empty((1, 2), dtype=object)
    names_[0, :] = ["Acura RL Sedan 2012", "AM General Hummer SUV 2000"]
    # the all-in-one file keeps paths relative to the dataset folder: car_ims/000001.jpg
    (raw / "cars_annos.mat").write_bytes(mat(annotations=struct(recs), class_names=names_))
    df = check_manifest(
        prepare("stanford_cars", tmp_path / "resources", tmp_path / "out", progress=False),
        {"train": 4, "test": 2, "classes": ["Acura RL Sedan 2012", "AM General Hummer SUV 2000"]},
        "files",
    )
    assert len(df) == 6


def test_changed_archive_reprepares(server, tmp_path):
    """A new pinned archive version replaces the extracted folder and the manifest."""
    blobs, _ = BUILDERS["fgvc_aircraft"]()
    entry = serve_entry(server, get("fgvc_aircraft"), blobs)
    res, out = tmp_path / "res", tmp_path / "out"
    prepare(entry, res, out, base_url=server.url, progress=False)
    (res / "fgvc_aircraft" / "fgvc-aircraft-2013b.tar.gz").unlink()
    from data_builders import make_tar, jpeg

    m = {"fgvc-aircraft-2013b/data/images/1.jpg": jpeg(1), "fgvc-aircraft-2013b/data/images/2.jpg": jpeg(2)}
    d = "fgvc-aircraft-2013b/data/"
    m[d + "variants.txt"] = b"A300B4\nA310\n"
    m[d + "images_variant_trainval.txt"] = b"1 A300B4\n"
    m[d + "images_variant_test.txt"] = b"2 A310\n"
    entry2 = serve_entry(server, get("fgvc_aircraft"), {"fgvc-aircraft-2013b.tar.gz": make_tar(m)})
    with pytest.warns(UserWarning, match="test images but no training images.*A310"):  # its one image is a test image
        df = read_manifest(prepare(entry2, res, out, base_url=server.url, progress=False))
    assert list(df["class_name"]) == ["A300B4", "A310"]
    assert not (res / "fgvc_aircraft" / "fgvc-aircraft-2013b" / "fgvc-aircraft-2013b" / "data" / "images" / "1025794.jpg").exists()


def test_deleted_extraction_is_redone_without_network(server, tmp_path):
    blobs, expected = BUILDERS["cub200"]()
    entry = serve_entry(server, get("cub200"), blobs)
    res, out = tmp_path / "res", tmp_path / "out"
    prepare(entry, res, out, base_url=server.url, progress=False)
    shutil.rmtree(res / "cub200" / "CUB_200_2011")
    hits = server.hits()
    check_manifest(prepare(entry, res, out, base_url=server.url, progress=False), expected, "files")
    assert server.hits() == hits
