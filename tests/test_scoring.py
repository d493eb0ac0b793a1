"""`finetail transferability`: a source's pretrained networks scored on a target's training
images (finetail.scoring), on an array store and on image files (the large-image path)."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from finetail import transferability as tf
from finetail.features import load_feature_model
from finetail.fileio import file_sha256
from finetail.manifest import load_array_split

from conftest import write_toy_file_manifest, write_toy_manifest

pytestmark = pytest.mark.slow  # starts training subprocesses

RECIPE = dict(model="resnet8", width=8, epochs=1, batch_size=8, lr=0.05, warmup_epochs=1, milestones=[], lr_factors=[],
              eval_every=1, num_workers=0, deterministic=True)


def _cli(*args, ok=True):
    r = subprocess.run([sys.executable, "-m", "finetail.cli", *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A pipeline network pretrained (1 epoch) on a 3-class toy source: its model.pt."""
    root = tmp_path_factory.mktemp("scoring")
    manifest = write_toy_manifest(root / "src", 10, 4, names=("s0", "s1", "s2"))
    spec = {"recipe": {**RECIPE, "image_size": 16}, "loss": {"type": "softmax"}}
    _cli("train", "--manifest", str(manifest), "--spec", json.dumps(spec), "--out-dir", str(root / "out"),
         "--checkpoint", str(root / "ck" / "last.pt"), "--study-dir", str(root / "study"), "--rule", "test",
         "--save-model", str(root / "out" / "model.pt"), "--device", "cpu")
    return root / "out" / "model.pt"


def test_scores_of_an_array_target_are_the_scores_of_the_networks_outputs(source, tmp_path):
    target = write_toy_manifest(tmp_path / "tgt", 7, 2, names=("a", "b", "c", "d"))
    out = tmp_path / "scores.csv"
    spec = {"source": "toy", "target": "tgt", "scores": list(tf.SCORES), "knn_k": 5}
    _cli("transferability", "--models", str(source), str(source), "--seeds", "0", "1", "--manifest", str(target),
         "--spec", json.dumps(spec), "--out", str(out), "--device", "cpu")
    df = pd.read_csv(out)
    assert df["seed"].tolist() == [0, 1] and set(df["source"]) == {"toy"} and set(df["target"]) == {"tgt"}
    assert (df["n_images"] == 28).all() and (df["n_classes"] == 4).all() and (df["source_classes"] == 3).all()
    assert (df["feature_dim"] == 32).all() and (df["manifest_sha256"] == file_sha256(target)).all()
    assert df["n_le_d"].all()  # 28 images, 32-d features: N <= D, where the plain H-score is C - 1

    model = torch.load(source, weights_only=True)
    assert (df["model_run_id"] == model["run_id"]).all()
    # the same network twice: the same scores
    for name in tf.SCORES:
        assert df[name].iloc[0] == pytest.approx(df[name].iloc[1], rel=1e-9) and (df[f"{name}_s"] >= 0).all()
    # against the network's own outputs, computed here: backbone features, softmax of the head
    fm = load_feature_model(str(source))
    data = load_array_split(target, "train")
    with torch.no_grad():
        x = (torch.from_numpy(data.images).permute(0, 3, 1, 2).float() - fm.mean) / fm.std
        f = fm.backbone.eval()(x)
        p = torch.softmax(fm.head.eval()(f).double(), dim=1).numpy()
    f = f.double().numpy()
    assert df["logme"].iloc[0] == pytest.approx(tf.logme(f, data.labels), rel=1e-5)
    assert df["hscore"].iloc[0] == pytest.approx(tf.hscore(f, data.labels), rel=1e-4)
    assert df["regularized_hscore"].iloc[0] == pytest.approx(tf.regularized_hscore(f, data.labels), rel=1e-4)
    assert df["leep"].iloc[0] == pytest.approx(tf.leep(p, data.labels), rel=1e-6)
    assert df["nce"].iloc[0] == pytest.approx(tf.nce(p.argmax(1), data.labels), rel=1e-6)
    assert df["knn"].iloc[0] == pytest.approx(tf.knn_accuracy(f, data.labels, k=5))


def test_a_file_target_goes_through_the_large_image_path(source, tmp_path):
    manifest, _, _ = write_toy_file_manifest(tmp_path / "files", 6, 2, height=30, width=40)
    out = tmp_path / "scores.csv"
    r = _cli("transferability", "--models", str(source), "--seeds", "0", "--manifest", str(manifest), "--spec",
             json.dumps({"source": "toy", "target": "files", "scores": ["logme", "knn"], "knn_k": 50}),
             "--out", str(out), "--workers", "0", "--device", "cpu")
    df = pd.read_csv(out)
    assert df["n_images"].tolist() == [18] and np.isfinite(df[["logme", "knn"]].to_numpy()).all()
    assert "leep" not in df.columns  # only the scores asked for
    assert "knn" in r.stderr + r.stdout  # k capped at N - 1 = 17, not an error


def test_bad_arguments_fail_in_one_line_and_write_nothing(source, tmp_path):
    target = write_toy_manifest(tmp_path / "tgt", 4, 2)
    out = tmp_path / "scores.csv"
    r = _cli("transferability", "--models", str(source), "--seeds", "0", "1", "--manifest", str(target), "--spec",
             "{}", "--out", str(out), ok=False)
    assert r.returncode == 2 and "1 models but 2 seeds" in r.stderr and not out.exists()
    r = _cli("transferability", "--models", str(source), "--seeds", "0", "--manifest", str(target), "--spec",
             json.dumps({"scores": ["logme", "fancy"]}), "--out", str(out), ok=False)
    assert r.returncode == 2 and "fancy" in r.stderr and not out.exists()
