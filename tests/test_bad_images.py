"""Bad input fails at prepare time in one line, naming the thing; images are read as they are.

Corrupt, truncated, empty and non-image files (both store kinds, ``on_bad_image`` error and
skip), 16-bit PNGs (array store, pre-resize and the file loader), the per-file sha256 that
file manifests carry, CSV paths that leave their folder, classes without training images,
and one-line CLI errors for bad weights names, unsafe and corrupt archives.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from data_builders import BUILDERS, FileServer, jpeg, make_tar, serve_entry
from finetail.datasets import (
    ArchiveError,
    BadImageError,
    BadImageWarning,
    ChecksumError,
    DownloadError,
    ManualDownloadRequired,
    UnsafeArchiveError,
    get,
    imagefolder,
    pre_resize,
    prepare,
    prepare_imagefolder,
)
from finetail.datasets.store import read_image
from finetail.errors import UserError
from finetail.loader import TrainBatches, eval_batches, load_file_split
from finetail.fileio import file_sha256
from finetail.manifest import FILE_SHA256, data_files, load_array_split, read_manifest

# ------------------------------------------------------------------------------ helpers


def _noisy_jpeg(seed: int, size=(64, 48)) -> bytes:
    """A JPEG whose entropy-coded data is long enough to cut in the middle of the scan."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


BAD = {
    # name: (bytes, what the one-line message says)
    "truncated": (_noisy_jpeg(7)[: len(_noisy_jpeg(7)) // 2], "cannot decode (truncated JPEG)"),
    "empty": (b"", "empty file (0 bytes)"),
    "text": (b"name,label\nthis is a CSV, not a photo\n", "not an image"),
}


def _tree(root: Path, size=(64, 48), test_only: tuple[str, ...] = ()) -> Path:
    """train/{a,b}/ x 3 and test/{a,b}/ x 2 noisy JPEGs of one size (+ test-only classes)."""
    seed = 0
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("a", "b", *(test_only if split == "test" else ())):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                (root / split / cls / f"{k}.jpg").write_bytes(_noisy_jpeg(seed, size))
                seed += 1
    return root


def _png16_grey(value: int, size=(40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _png16_rgb(rgb: tuple[int, int, int], size=(40, 32)) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    w, h = size
    row = b"\x00" + np.tile(np.asarray(rgb, dtype=">u2"), w).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * h)) + chunk(b"IEND", b"")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetail.cli", *args], capture_output=True, text=True, timeout=300)


def _prepare_cli(spec: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _cli("prepare", "--dataset", "birds", "--spec", json.dumps(spec), "--out-dir", str(out), *extra)


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    """The CLI failed with exactly one stderr line '[finetail HH:MM:SS] error: ...'."""
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("[finetail") and "error:" in lines[0], lines[0]
    return lines[0]


def _sha_matches_files(manifest: Path) -> None:
    df = read_manifest(manifest)
    assert FILE_SHA256 in df.columns
    for path, recorded in data_files(manifest, df):
        assert recorded == file_sha256(path), path


# ---------------------------------------------------------------- corrupt files, both kinds


@pytest.mark.parametrize("kind", ["files", "array"])
@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_image_is_an_error_naming_the_file(bad, kind, tmp_path):
    tree = _tree(tmp_path / "tree")
    data, what = BAD[bad]
    target = tree / "train" / "a" / "bad.jpg"
    target.write_bytes(data)
    with pytest.raises(BadImageError) as info:
        prepare_imagefolder(tree, tmp_path / "out", kind=kind)
    msg = str(info.value)
    assert isinstance(info.value, UserError)
    assert msg.startswith(f"{target}: ") and what in msg and "\n" not in msg
    assert not (tmp_path / "out" / "manifest.parquet").exists()


@pytest.mark.parametrize("kind", ["files", "array"])
def test_bad_images_are_skipped_with_a_warning_each_and_a_count(kind, tmp_path):
    tree = _tree(tmp_path / "tree")
    for name, (data, _) in BAD.items():
        (tree / "train" / "b" / f"{name}.jpg").write_bytes(data)
    with pytest.warns(BadImageWarning) as record:
        out = prepare_imagefolder(tree, tmp_path / "out", kind=kind, on_bad_image="skip")
    messages = [str(w.message) for w in record if w.category is BadImageWarning]
    for name, (_, what) in BAD.items():
        assert any(m.startswith(str(tree / "train" / "b" / f"{name}.jpg")) and what in m for m in messages), messages
    assert messages[-1] == "skipped 3 of 13 images that cannot be read (on_bad_image: skip)"
    df = read_manifest(out)
    assert len(df) == 10 and df.groupby("split").size().to_dict() == {"test": 4, "train": 6}
    if kind == "array":
        tr = load_array_split(out, "train")
        assert tr.images.shape == (6, 48, 64, 3) and np.bincount(tr.labels).tolist() == [3, 3]
    else:
        assert not any(Path(p).stem in BAD for p in df["path"])
        _sha_matches_files(out)


def test_on_bad_image_value_is_checked(tmp_path):
    with pytest.raises(ValueError, match="on_bad_image"):
        prepare_imagefolder(_tree(tmp_path / "tree"), tmp_path / "out", on_bad_image="ignore")


def test_missing_file_of_a_csv_is_named(tmp_path):
    _tree(tmp_path / "tree")
    csv = tmp_path / "m.csv"
    pd.DataFrame({"path": ["tree/train/a/0.jpg", "tree/train/a/nope.jpg"], "class_name": ["a", "a"],
                  "split": ["train", "train"]}).to_csv(csv, index=False)
    with pytest.raises(BadImageError, match=r"nope\.jpg: no such file"):
        prepare_imagefolder(csv, tmp_path / "out")


@pytest.fixture
def server():
    with FileServer() as s:
        yield s


def _tar_members(blob: bytes) -> dict[str, bytes]:
    """Name -> bytes of every regular file in a tar archive held in memory."""
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_registry_dataset_with_a_truncated_image(mode, server, tmp_path):
    blobs, expected = BUILDERS["cub200"]()
    members = _tar_members(blobs["CUB_200_2011.tgz"])
    victim = sorted(n for n in members if n.endswith(".jpg"))[0]
    members[victim] = b""
    blobs["CUB_200_2011.tgz"] = make_tar(members)
    entry = serve_entry(server, get("cub200"), blobs)
    res, out = tmp_path / "res", tmp_path / "out"
    bad_path = res / "cub200" / "CUB_200_2011" / victim
    if mode == "error":
        with pytest.raises(BadImageError, match=f"^{bad_path}: empty file"):
            prepare(entry, res, out, base_url=server.url, progress=False)
        assert not (out / "manifest.parquet").exists()
        return
    with pytest.warns(BadImageWarning) as record:
        m = prepare(entry, res, out, base_url=server.url, progress=False, on_bad_image="skip")
    assert [str(w.message) for w in record] == [
        f"{bad_path}: empty file (0 bytes); skipped (on_bad_image: skip)",
        "skipped 1 of 9 images that cannot be read (on_bad_image: skip)",
    ]
    df = read_manifest(m)
    assert len(df) == expected["train"] + expected["test"] - 1
    _sha_matches_files(m)


def test_corrupt_cifar_batch_names_the_file(server, tmp_path):
    blobs, _ = BUILDERS["cifar10"]()
    members = _tar_members(blobs["cifar-10-python.tar.gz"])
    # labels intact (the parser reads them), pixels cut short: 100 bytes an image, not 3,072
    batch = pickle.loads(members["cifar-10-batches-py/data_batch_2"], encoding="bytes")
    batch[b"data"] = batch[b"data"][:, :100]
    members["cifar-10-batches-py/data_batch_2"] = pickle.dumps(batch, protocol=2)
    blobs["cifar-10-python.tar.gz"] = make_tar(members)
    entry = serve_entry(server, get("cifar10"), blobs)
    with pytest.raises(UserError, match=r"data_batch_2: not a CIFAR python batch \(no 'data' array") as info:
        prepare(entry, tmp_path / "res", tmp_path / "out", base_url=server.url, progress=False)
    assert "\n" not in str(info.value)


# -------------------------------------------------------------------------- sha256 column


def test_file_manifests_carry_each_files_sha256(server, tmp_path):
    out = prepare_imagefolder(_tree(tmp_path / "tree"), tmp_path / "folder")
    _sha_matches_files(out)
    blobs, _ = BUILDERS["food101"]()
    m = prepare(serve_entry(server, get("food101"), blobs), tmp_path / "res", tmp_path / "food", base_url=server.url,
                progress=False)
    _sha_matches_files(m)
    small = pre_resize(out, tmp_path / "small", short_side=16)
    assert FILE_SHA256 in small.columns
    _sha_matches_files(tmp_path / "small" / "manifest.parquet")
    assert set(small[FILE_SHA256]).isdisjoint(read_manifest(out)[FILE_SHA256])  # the copies' digests
    again = pre_resize(out, tmp_path / "small", short_side=16)  # kept copies: same digests
    assert again[FILE_SHA256].tolist() == small[FILE_SHA256].tolist()


def test_prepare_cli_with_pre_resize_records_both_digests(tmp_path):
    r = _prepare_cli({"kind": "imagefolder", "source": str(_tree(tmp_path / "tree")), "short_side": 16}, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    _sha_matches_files(tmp_path / "out" / "manifest.parquet")
    _sha_matches_files(tmp_path / "out" / "original" / "manifest.parquet")


# ----------------------------------------------------------------------------- 16-bit PNG


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    (tmp_path / "g.png").write_bytes(_png16_grey(20000))
    (tmp_path / "c.png").write_bytes(_png16_rgb((20000, 65535, 255)))
    assert (read_image(tmp_path / "g.png") == 78).all()  # 20000 >> 8
    assert read_image(tmp_path / "c.png")[0, 0].tolist() == [78, 255, 0]


def test_16bit_png_in_the_array_store_and_pre_resize(tmp_path):
    for split in ("train", "test"):
        for cls, value in (("dim", 20000), ("bright", 60000)):
            (tmp_path / "t" / split / cls).mkdir(parents=True)
            (tmp_path / "t" / split / cls / "0.png").write_bytes(_png16_grey(value))
        (tmp_path / "t" / split / "rgb").mkdir()
        (tmp_path / "t" / split / "rgb" / "0.png").write_bytes(_png16_rgb((20000, 65535, 255)))
    out = prepare_imagefolder(tmp_path / "t", tmp_path / "arr", kind="array")
    tr = load_array_split(out, "train")
    by_class = {tr.class_names[y]: img for img, y in zip(tr.images, tr.labels, strict=True)}
    assert (by_class["dim"] == 78).all() and (by_class["bright"] == 60000 >> 8).all()
    assert (by_class["rgb"].reshape(-1, 3) == [78, 255, 0]).all()
    files = prepare_imagefolder(tmp_path / "t", tmp_path / "files")
    pre_resize(files, tmp_path / "small", short_side=16)
    small = read_manifest(tmp_path / "small" / "manifest.parquet")
    dim = small[small["class_name"] == "dim"].iloc[0]
    assert abs(read_image(tmp_path / "small" / dim["path"]).astype(int) - 78).max() <= 2  # a JPEG copy


@pytest.mark.slow
def test_16bit_png_file_manifest_trains_through_the_loader(tmp_path):
    rows = []
    for split, n in (("train", 4), ("test", 2)):
        for y, value in enumerate((20000, 60000)):
            for k in range(n):
                rel = f"{split}/c{y}/{k}.png"
                (tmp_path / "d" / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / "d" / rel).write_bytes(_png16_grey(value + 16 * k))
                rows.append((rel, f"c{y}", split))
    csv = tmp_path / "d" / "m.csv"
    pd.DataFrame(rows, columns=["path", "class_name", "split"]).to_csv(csv, index=False)
    m = prepare_imagefolder(csv, tmp_path / "out")
    dev = torch.device("cpu")
    te = load_file_split(m, "test")
    x, y = next(eval_batches(te.images, te.labels, size=32, batch_size=4, device=dev, workers=0))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32)
    assert [int(v) for v in x.flatten(1).float().mean(1)] == [78, 78, 234, 234]  # 20000 >> 8, 60000 >> 8
    tr = load_file_split(m, "train")
    batches = TrainBatches(tr.images, tr.labels, size=32, batch_size=4, seed=0, flip=True, device=dev, workers=0)
    seen = list(batches.epoch(0))
    assert sum(len(b) for b, _ in seen) == 8 and all(b.dtype == torch.uint8 for b, _ in seen)
    assert {int(b.max()) for b, _ in seen} <= {78, 234}

    from finetail.training.loop import train
    from finetail.training.recipe import TrainConfig

    cfg = TrainConfig.from_dict(dict(model="resnet8", width=8, batch_size=4, lr=0.05, epochs=1, warmup_epochs=0,
                                     milestones=[], lr_factors=[], image_size=32, num_workers=0))
    res = train(cfg, tr.images, tr.labels, te.images, te.labels, 2, tmp_path / "ckpt.pt", device="cpu")
    assert np.isfinite(res.metrics["top1_error"])


def test_loader_names_an_unreadable_file(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    from finetail.loader import _decode
    from torchvision.io import read_file

    with pytest.raises(BadImageError, match=f"^{bad}: cannot decode"):
        _decode(read_file(str(bad)), str(bad))


# ----------------------------------------------------------------------------- CSV paths


@pytest.mark.parametrize("path", ["../x.jpg", "a/../../x.jpg", "./a/../../imgs/x.jpg", ".."])
def test_csv_path_leaving_its_folder_is_refused(path, tmp_path):
    (tmp_path / "data").mkdir()
    csv = tmp_path / "data" / "m.csv"
    pd.DataFrame({"path": ["ok.jpg", path], "class_name": ["a", "a"], "split": ["train", "test"]}).to_csv(csv, index=False)
    with pytest.raises(UserError, match=f"row 2: path '{path}' leaves the CSV's folder"):
        imagefolder(csv)


def test_csv_absolute_and_inner_dotdot_paths_are_allowed(tmp_path):
    _tree(tmp_path / "tree")
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "own.jpg").write_bytes(jpeg(1, (64, 48)))
    csv = tmp_path / "data" / "m.csv"
    absolute = str((tmp_path / "tree" / "train" / "a" / "0.jpg").resolve())
    pd.DataFrame({"path": [absolute, "a/../a/own.jpg"], "class_name": ["a", "a"], "split": ["train", "test"]}).to_csv(
        csv, index=False)
    out = prepare_imagefolder(csv, tmp_path / "out")
    m = read_manifest(out)
    assert len(m) == 2
    assert (out.parent / m["path"].iloc[0]).resolve() == Path(absolute)
    _sha_matches_files(out)


# ------------------------------------------------------------------- test-only classes


def test_class_with_test_images_but_no_training_images_is_warned_about(tmp_path):
    tree = _tree(tmp_path / "tree", test_only=("ghost", "phantom"))
    with pytest.warns(UserWarning, match=r"2 of 4 classes have test images but no training images.*ghost, phantom"):
        prepare_imagefolder(tree, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete dataset: no warning
        prepare_imagefolder(_tree(tmp_path / "full"), tmp_path / "out2")
    r = _prepare_cli({"kind": "imagefolder", "source": str(tree)}, tmp_path / "out3")
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if "warning:" in line]
    assert len(warned) == 1 and warned[0].startswith("[finetail") and "ghost, phantom" in warned[0]


# ------------------------------------------------------------------- one-line CLI errors


def test_user_errors_are_user_errors_and_keep_their_bases():
    for cls in (ChecksumError, DownloadError, UnsafeArchiveError, ArchiveError, BadImageError):
        assert issubclass(cls, UserError)
    assert issubclass(ManualDownloadRequired, FileNotFoundError) and issubclass(ManualDownloadRequired, UserError)


@pytest.mark.slow
def test_cli_bad_image_is_one_line_and_skip_logs_warnings(tmp_path):
    tree = _tree(tmp_path / "tree")
    bad = tree / "test" / "b" / "broken.jpg"
    bad.write_bytes(BAD["truncated"][0])
    line = _one_line_error(_prepare_cli({"kind": "imagefolder", "source": str(tree)}, tmp_path / "out"))
    assert f"{bad}: cannot decode (truncated JPEG)" in line
    r = _prepare_cli({"kind": "imagefolder", "source": str(tree), "on_bad_image": "skip", "store": "array"},
                     tmp_path / "out")
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if "warning:" in line]
    assert len(warned) == 2 and str(bad) in warned[0] and "skipped 1 of 11" in warned[1]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_bad_torchvision_names_are_one_line(tmp_path):
    common = ["--model-name", "m", "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "f.npz")]
    line = _one_line_error(_cli("features", "--model", "tv:resnet18", "--weights", "IMAGENET1K_V7", *common))
    assert "'IMAGENET1K_V7'" in line and "resnet18" in line and "IMAGENET1K_V1" in line
    line = _one_line_error(_cli("features", "--model", "tv:resnet19", *common))
    assert "'resnet19'" in line and "resnet18" in line


@pytest.mark.slow
def test_cli_unsafe_and_corrupt_archives_are_one_line(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    evil.write_bytes(make_tar({"train/a/0.jpg": jpeg(0), "../outside.jpg": jpeg(1)}))
    line = _one_line_error(_prepare_cli({"kind": "imagefolder", "source": str(evil)}, tmp_path / "out"))
    assert "evil.tar.gz: member '..' escapes the output folder" in line
    assert not (tmp_path / "outside.jpg").exists()
    cut = tmp_path / "cut.tar.gz"
    whole = make_tar({f"train/a/{k}.jpg": _noisy_jpeg(k, (256, 256)) for k in range(4)})
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ArchiveError):
        prepare_imagefolder(cut, tmp_path / "out2")
    line = _one_line_error(_prepare_cli({"kind": "imagefolder", "source": str(cut)}, tmp_path / "out3"))
    assert "cut.tar.gz" in line and "truncated or corrupt" in line


def test_cli_csv_dotdot_is_one_line(tmp_path):
    csv = tmp_path / "m.csv"
    pd.DataFrame({"path": ["../x.jpg"], "class_name": ["a"], "split": ["train"]}).to_csv(csv, index=False)
    line = _one_line_error(_prepare_cli({"kind": "imagefolder", "source": str(csv)}, tmp_path / "out"))
    assert "'../x.jpg'" in line


def test_truncated_cifar_batch_is_a_one_line_error(tmp_path):
    """A CIFAR pickle cut short (an interrupted copy by hand, past any checksum) names the file."""
    import pickle

    from finetail.datasets.parsers import _unpickle
    from finetail.errors import UserError

    batch = tmp_path / "data_batch_1"
    data = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, protocol=2)
    batch.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="data_batch_1: not a readable CIFAR batch"):
        _unpickle(batch)
