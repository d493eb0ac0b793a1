"""The large-image path: a file manifest of real JPEGs (and a PNG) read through the loader,
trained through `finetail train`, resumed exactly after a mid-epoch SIGTERM."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import finetail.loader as loader
from finetail.training.checkpoint import load_checkpoint
from finetail.training.loop import Preempted, train
from finetail.training.recipe import TrainConfig
from finetail.loader import (TrainBatches, load_file_split, resized_crop_box, eval_batches,
                             eval_transform, train_transform)
from finetail.manifest import write_manifest

from conftest import assert_same_weights, toy_images

FAST = dict(model="resnet8", width=8, batch_size=8, lr=0.05, warmup_epochs=1, milestones=[6], lr_factors=[0.1],
            eval_every=2, image_size=32, num_workers=0, deterministic=True)


@pytest.fixture
def file_manifest(tmp_path):
    """3 classes x 8 training + 4 test images of 40 x 48 pixels, JPEG files (one PNG)."""
    rows = []
    for split, n, seed in (("train", 8, 0), ("test", 4, 1)):
        imgs, labels = toy_images(n, size=48, seed=seed)
        for i, (img, y) in enumerate(zip(imgs, labels, strict=True)):
            img = img[4:44]  # 40 high, 48 wide
            ext = "png" if (split, i) == ("train", 0) else "jpg"
            rel = f"images/{split}/c{y}/{i}.{ext}"
            (tmp_path / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(tmp_path / "files" / rel, quality=95)
            rows.append({"path": rel, "label": int(y), "class_name": f"c{y}", "split": split})
    write_manifest(pd.DataFrame(rows), tmp_path / "files" / "manifest.parquet")
    return tmp_path / "files" / "manifest.parquet"


def test_transforms_give_the_configured_size():
    img = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    rng = np.random.default_rng([0, 0, 0])
    for _ in range(50):
        top, left, h, w = resized_crop_box(40, 48, rng)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 48 and h > 0 and w > 0
    box = resized_crop_box(40, 48, np.random.default_rng([1, 2, 3]))
    assert box == resized_crop_box(40, 48, np.random.default_rng([1, 2, 3]))  # seeded by (seed, epoch, index)
    out = train_transform(img, box, True, 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    out = eval_transform(img, 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    # test: short side -> round(32 / 0.875) = 37, then the centre 32 x 32
    img = torch.randint(0, 256, (3, 37, 45), dtype=torch.uint8)
    assert torch.equal(eval_transform(img, 32), img[:, 2:34, 6:38])


def test_loader_batches_do_not_depend_on_workers(file_manifest):
    tr = load_file_split(file_manifest, "train")
    assert len(tr.images) == 24 and tr.class_names == ["c0", "c1", "c2"]
    assert any(p.endswith(".png") for p in tr.images.paths)
    dev = torch.device("cpu")
    runs = {}
    for workers in (0, 2):
        tb = TrainBatches(tr.images, tr.labels, size=32, batch_size=10, seed=3, flip=True, device=dev, workers=workers)
        runs[workers] = [list(tb.epoch(e)) for e in (0, 1)]
    for a, b in zip(runs[0], runs[2], strict=True):
        assert [x.shape for x, _ in a] == [(10, 3, 32, 32), (10, 3, 32, 32), (4, 3, 32, 32)]
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert xa.dtype == torch.uint8 and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(runs[0][0][0][0], runs[0][1][0][0])  # a new epoch, a new order and augmentation
    # a resumed epoch starts at step 1 with exactly the batches it would have had
    tb = TrainBatches(tr.images, tr.labels, size=32, batch_size=10, seed=3, flip=True, device=dev, workers=0)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(tb.epoch(1, first=1), runs[0][1][1:], strict=True))
    te = load_file_split(file_manifest, "test")
    batches = list(eval_batches(te.images, te.labels, size=32, batch_size=5, device=dev, workers=2))
    assert [x.shape[0] for x, _ in batches] == [5, 5, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.from_numpy(te.labels))


def test_pickled_cifar_manifests_are_refused(tmp_path):
    df = pd.DataFrame({"path": ["b"], "row": [0], "label": [0], "class_name": ["a"], "split": ["train"]})
    write_manifest(df, tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="store: array"):
        load_file_split(tmp_path / "m.parquet", "train")


def test_sigterm_mid_epoch_resumes_the_file_path_exactly(file_manifest, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    tr, te = load_file_split(file_manifest, "train"), load_file_split(file_manifest, "test")
    data = (tr.images, tr.labels, te.images, te.labels)
    cfg = TrainConfig(**FAST, epochs=3)  # 3 steps an epoch
    full = train(cfg, *data, 3, tmp_path / "a.pt", device="cpu", log=lambda m: None)
    assert all(0.0 <= h["data_wait_frac"] <= 1.0 for h in full.history)

    calls = {"n": 0}
    real_finish = loader._finish

    def finish_then_term(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 + 2:  # epoch 2 (index 1), second step
            os.kill(os.getpid(), signal.SIGTERM)
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(loader, "_finish", finish_then_term)
    with pytest.raises(Preempted):
        train(cfg, *data, 3, tmp_path / "b.pt", device="cpu", log=lambda m: None)
    monkeypatch.setattr(loader, "_finish", real_finish)
    state = load_checkpoint(tmp_path / "b.pt")
    assert state["epoch"] == 0 and state["mid_iter"] == 2
    logs = []
    resumed = train(cfg, *data, 3, tmp_path / "b.pt", device="cpu", log=logs.append)
    assert any("at epoch 1, iteration 2" in m for m in logs)
    assert_same_weights(full.model, resumed.model)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in full.history])
    assert resumed.metrics == full.metrics


@pytest.mark.slow
def test_cli_trains_a_file_manifest(file_manifest, tmp_path):
    spec = {"recipe": {**FAST, "epochs": 2, "num_workers": 2}, "loss": {"type": "softmax"}}
    cmd = [sys.executable, "-m", "finetail.cli", "train", "--manifest", str(file_manifest), "--spec", json.dumps(spec),
           "--out-dir", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "ck" / "last.pt"),
           "--study-dir", str(tmp_path / "study"), "--rule", "test", "--save-model", str(tmp_path / "out" / "model.pt"),
           "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "img/s" in r.stderr and "waiting for data" in r.stderr
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["num_train"] == 24 and record["epochs"] == 2 and record["mean_images_per_s"] > 0
    hist = pd.read_csv(tmp_path / "out" / "history.csv")
    assert len(hist) == 2 and (hist["images_per_s"] > 0).all() and "data_wait_frac" in hist
    model = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert json.loads(model["normalisation"])["mean"] == pytest.approx(loader.IMAGENET_NORMALISATION["mean"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'study' / 'mlflow.db'}")
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(record["run_id"], "images_per_s")] == [0, 1]


@pytest.mark.slow
def test_file_path_under_torchrun_matches_one_process(file_manifest, tmp_path):
    """Two gloo ranks each load their slice of every global batch of files; a linear probe (no
    BatchNorm batch statistics) then follows the single-process run to float rounding."""
    spec = {"recipe": {**FAST, "epochs": 2, "num_workers": 1, "linear_probe": True}, "loss": {"type": "softmax"}}
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK")} | {"OMP_NUM_THREADS": "1"}
    for nproc in (1, 2):
        cmd = [sys.executable, "-m", "finetail.cli", "train", "--manifest", str(file_manifest), "--spec",
               json.dumps(spec), "--out-dir", str(tmp_path / f"n{nproc}"), "--checkpoint",
               str(tmp_path / f"n{nproc}" / "ck.pt"), "--study-dir", str(tmp_path / "study"), "--rule", "test",
               "--wildcards", json.dumps({"n": nproc}), "--device", "cpu", "--nproc", str(nproc)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-4000:]
    assert "rank 1/2:" in r.stderr
    h1 = pd.read_csv(tmp_path / "n1" / "history.csv")
    h2 = pd.read_csv(tmp_path / "n2" / "history.csv")
    np.testing.assert_allclose(h2["train_loss"], h1["train_loss"], rtol=1e-5)
    np.testing.assert_array_equal(h2["train_acc"], h1["train_acc"])
    m1 = json.loads((tmp_path / "n1" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "n2" / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m2["final"]["top1_error"] == m1["final"]["top1_error"]
