"""Transfer half: pooling, class-mean features, fine-tuning from exactly the pretrained backbone,
and the DAG's shape (every source x target fine-tune)."""

import pytest
import json
import re
import subprocess
import sys

import numpy as np
import yaml
import pandas as pd
import torch

from finetail.training.loop import train
from finetail.training.recipe import TrainConfig
from finetail.features import FeatureModel, class_mean_features, state_digest
from finetail.manifest import load_array_split, write_array_dataset

from conftest import ROOT, assert_same_weights, toy_images

RECIPE = {"model": "resnet8", "width": 4, "epochs": 2, "batch_size": 16, "lr": 0.05, "warmup_epochs": 1,
          "milestones": [], "lr_factors": [], "eval_every": 1, "deterministic": True}


def _dataset(folder, num_classes, prefix, seed):
    xtr, ytr = toy_images(12, num_classes, seed=seed)
    xte, yte = toy_images(4, num_classes, seed=seed + 100)
    split = np.array(["train"] * len(ytr) + ["test"] * len(yte), dtype=object)
    write_array_dataset(folder, np.concatenate([xtr, xte]), np.concatenate([ytr, yte]),
                        [f"{prefix}{i}" for i in range(num_classes)], split)
    return folder / "manifest.parquet"


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "finetail.cli", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def test_pool_relabels_and_filters_classes(tmp_path):
    a = _dataset(tmp_path / "a", 3, "a", 0)
    b = _dataset(tmp_path / "b", 2, "b", 1)
    _cli("pool", "--inputs", str(a), str(b), "--out-dir", str(tmp_path / "ab"))
    ab = pd.read_parquet(tmp_path / "ab" / "manifest.parquet")
    names = ab.groupby("label")["class_name"].first().tolist()
    assert names == ["a0", "a1", "a2", "b0", "b1"]
    # images still resolve through the rebased store paths
    split = load_array_split(tmp_path / "ab" / "manifest.parquet", "train")
    assert split.images.shape[0] == 5 * 12
    pd.DataFrame({"class_name": ["b1", "a2"]}).to_csv(tmp_path / "keep.csv", index=False)
    _cli("pool", "--inputs", str(a), str(b), "--classes", str(tmp_path / "keep.csv"), "--out-dir", str(tmp_path / "sel"))
    sel = pd.read_parquet(tmp_path / "sel" / "manifest.parquet")
    assert sel.groupby("label")["class_name"].first().tolist() == ["a2", "b1"]
    assert len(sel) == 2 * 16


def test_pool_refuses_unknown_classes(tmp_path):
    a = _dataset(tmp_path / "a", 3, "a", 0)
    pd.DataFrame({"class_name": ["zz"]}).to_csv(tmp_path / "keep.csv", index=False)
    r = subprocess.run([sys.executable, "-m", "finetail.cli", "pool", "--inputs", str(a), "--classes",
                        str(tmp_path / "keep.csv"), "--out-dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "zz" in r.stderr


def test_class_mean_features_are_per_class_means():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    fm = FeatureModel(net, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), {"kind": "test", "sha256": ""})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (11, 4, 4, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0])
    means, counts = class_mean_features(fm, images, labels, 4, batch=3)
    with torch.no_grad():
        f = net(torch.from_numpy(images).permute(0, 3, 1, 2).float()).double().numpy()
    for c in range(3):
        np.testing.assert_allclose(means[c], f[labels == c].mean(0), rtol=1e-5)
    assert counts.tolist() == [5, 3, 3, 0]


@pytest.mark.slow
def test_finetune_starts_from_exactly_the_pretrained_backbone(tmp_path):
    src = _dataset(tmp_path / "src", 4, "s", 0)
    tgt = _dataset(tmp_path / "tgt", 3, "t", 7)
    spec = json.dumps({"recipe": RECIPE, "loss": {"type": "softmax"}, "shots": {}})
    common = ["--spec", spec, "--study-dir", str(tmp_path / "study"), "--device", "cpu"]
    _cli("train", "--manifest", str(src), "--out-dir", str(tmp_path / "pre"), "--checkpoint", str(tmp_path / "pre.pt"),
         "--save-model", str(tmp_path / "pre" / "model.pt"), "--rule", "pretrain", *common)
    pre = json.loads((tmp_path / "pre" / "metrics.json").read_text())
    _cli("train", "--manifest", str(tgt), "--out-dir", str(tmp_path / "ft"), "--checkpoint", str(tmp_path / "ft.pt"),
         "--init-model", str(tmp_path / "pre" / "model.pt"), "--rule", "finetune", *common)
    ft = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    saved = torch.load(tmp_path / "pre" / "model.pt", weights_only=True)
    assert ft["start_backbone_sha256"] == state_digest(saved["backbone"])
    assert ft["start_backbone_sha256"] != pre["start_backbone_sha256"]  # not a fresh initialisation
    assert ft["parent_run_id"] == pre["run_id"]
    assert ft["num_classes"] == 3  # a new head for the target
    assert ft["inputs"]["init_model_sha256"] == pre["model_sha256"]

    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path / 'study' / 'mlflow.db'}").get_run(ft["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == pre["run_id"]
    assert run.data.tags["finetail.input.init_model.sha256"] == pre["model_sha256"]


def test_linear_probe_keeps_the_backbone(tmp_path):
    tgt = _dataset(tmp_path / "tgt", 3, "t", 7)
    tr, te = load_array_split(tgt, "train"), load_array_split(tgt, "test")
    torch.manual_seed(1)
    from finetail.models import build_model

    backbone = build_model("resnet8", 5, 4).backbone.state_dict()
    cfg = TrainConfig(**{**RECIPE, "linear_probe": True})
    res = train(cfg, tr.images, tr.labels, te.images, te.labels, 3, tmp_path / "ck.pt", init_backbone=backbone,
                device="cpu", log=lambda m: None)
    assert_same_weights(res.model.backbone, backbone)


@pytest.mark.slow
def test_default_dag_holds_every_source_target_finetune(tmp_path):
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                        "--configfile", str(ROOT / "config.yaml"), "-n", "--cores", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    planned = set(re.findall(r"results/default/finetune/([^/\s]+)/([^/\s]+)/seed(\d+)/metrics\.json", r.stdout))
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    tr = config["transfer"]
    ranked = [*tr["sources"], tr["selection"]["name"], tr["selection"]["random"]["name"]]
    sources = ranked + (["scratch"] if tr["finetune"]["scratch"] else [])
    targets, seeds = tr["targets"], list(range(config["replicates"]["count"]))
    assert len(targets) >= 3 and len(seeds) >= 3 and len(ranked) >= 4
    assert planned == {(s, t, str(k)) for s in sources for t in targets for k in seeds}
    # every ranked source x the replicates; the feature network (probe) once per replicate, by its own rule
    assert re.search(rf"^pretrain\s+{len(ranked) * len(seeds)}$", r.stdout, flags=re.M)
    assert re.search(rf"^feature_network\s+{len(seeds)}$", r.stdout, flags=re.M)
    assert re.search(rf"^finetune\s+{len(sources) * len(targets) * len(seeds)}$", r.stdout, flags=re.M)
    # every ranked source's network scored on every target, one job per pair and replicate
    assert re.search(rf"^transferability\s+{len(ranked) * len(targets) * len(seeds)}$", r.stdout, flags=re.M)
    assert re.search(rf"^random_subset\s+{len(seeds)}$", r.stdout, flags=re.M)


@pytest.mark.slow
def test_torchvision_feature_model_identity_without_download(tmp_path):
    """The torchvision path (users with internet pass weights=...); here without weights."""
    from finetail.features import load_feature_model
    from finetail.similarity import load_class_stats

    tgt = _dataset(tmp_path / "tgt", 2, "t", 3)
    fm = load_feature_model("tv:resnet18")
    assert fm.identity["kind"] == "torchvision" and len(fm.identity["sha256"]) == 64
    _cli("features", "--model", "tv:resnet18", "--model-name", "tv:resnet18", "--manifest", str(tgt),
         "--out", str(tmp_path / "f.npz"))
    stats = load_class_stats(tmp_path / "f.npz")
    assert stats.means.shape == (2, 512) and stats.counts.tolist() == [12, 12]
    assert stats.meta["model_kind"] == "torchvision"
