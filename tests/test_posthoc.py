"""Post-hoc corrections: the formulas by hand, tau chosen on held-out training images, and
``finetail posthoc`` (and cRT as a ``finetail train`` job) end to end on a trained LDAM-DRW cell."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from finetail.errors import UserError
from finetail.features import state_digest
from finetail.fileio import file_sha256
from finetail.manifest import write_array_dataset
from finetail.posthoc import check_method, choose_tau, crt_spec, logit_adjust, tau_normalize
from finetail.posthoc_job import parse_tau_grid
from finetail.training.recipe import TrainConfig

from conftest import toy_images


# --------------------------------------------------------------------------- the formulas
def test_logit_adjust_subtracts_tau_log_prior():
    z = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    counts = [6, 3, 1]  # pi = 0.6, 0.3, 0.1
    got = logit_adjust(z, counts, 0.5)[0].tolist()
    expect = [1.0 - 0.5 * math.log(0.6), 0.0 - 0.5 * math.log(0.3), -1.0 - 0.5 * math.log(0.1)]
    assert got == pytest.approx(expect, rel=1e-12)
    assert torch.equal(logit_adjust(z, counts, 0.0), z)
    with pytest.raises(ValueError, match="logits must be"):
        logit_adjust(torch.zeros(2, 2), counts, 1.0)


def test_tau_normalize_rescales_each_row_by_its_norm_to_the_tau():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)  # norms 5, 2, 0
    got = tau_normalize(w, 0.5).tolist()
    assert got[0] == pytest.approx([3 / math.sqrt(5), 4 / math.sqrt(5)], rel=1e-12)
    assert got[1] == pytest.approx([0.0, 2 / math.sqrt(2)], rel=1e-12)
    assert got[2] == [0.0, 0.0]  # a zero row stays zero, not NaN
    assert torch.equal(tau_normalize(w, 0.0), w)
    assert tau_normalize(w, 1.0)[:2].norm(dim=1).tolist() == pytest.approx([1.0, 1.0])


def test_choose_tau_takes_the_best_balanced_accuracy_first_on_ties():
    # Three held-out images of the rare class 1 and one of class 0; the raw logits favour class 0 by 1.
    labels = np.array([0, 1, 1, 1])
    z = torch.tensor([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    counts = np.array([9, 1])  # log(pi0/pi1) = log 9 = 2.197: tau > 1/2.197 flips the three, tau > 2/2.197 the first too
    choice = choose_tau(lambda t: logit_adjust(z, counts, t), labels, counts, [0.0, 0.25, 0.5, 0.75, 1.0])
    # balanced accuracy: tau 0, 0.25 -> (1 + 0) / 2; tau 0.5, 0.75 -> (1 + 1) / 2; tau 1 -> (0 + 1) / 2
    assert choice.balanced_acc == [0.5, 0.5, 1.0, 1.0, 0.5]
    assert (choice.tau, choice.source, choice.holdout_images, choice.holdout_classes) == (0.5, "holdout", 4, 2)


def test_tau_grid_and_crt_spec():
    assert parse_tau_grid("0:2:0.1")[:4] == [0.0, 0.1, 0.2, 0.3] and parse_tau_grid("0:2:0.1")[-1] == 2.0
    assert len(parse_tau_grid("0:2:0.1")) == 21
    with pytest.raises(ValueError, match="start:stop:step"):
        parse_tau_grid("0-2")
    cell = {"recipe": {"model": "resnet8", "width": 4, "holdout": 0.2, "epochs": 200, "weights": None},
            "loss": {"type": "ldam", "drw_epoch": 160}, "shots": {"many": 10, "few": 2}}
    spec = crt_spec(cell, epochs=10, lr=0.01)
    assert spec["recipe"] == {"model": "resnet8", "width": 4, "holdout": 0.2, "epochs": 10, "lr": 0.01,
                              "linear_probe": True, "sampler": "class_balanced"}
    assert spec["loss"] == {"type": "softmax"} and spec["shots"] == cell["shots"]
    assert TrainConfig.from_spec(spec).head == "linear"


def test_methods_refuse_models_they_do_not_apply_to():
    with pytest.raises(UserError, match="normalises them itself"):
        check_method("tau_norm", TrainConfig(loss="ldam"))
    with pytest.raises(UserError, match="assumes a softmax model"):
        check_method("logit_adjust", TrainConfig(loss="focal", gamma=1.0))
    check_method("logit_adjust", TrainConfig(loss="ldam"))
    check_method("tau_norm", TrainConfig(loss="balanced_softmax"))


# --------------------------------------------------------------------------- end to end
RECIPE = {"model": "resnet8", "width": 4, "epochs": 2, "batch_size": 16, "lr": 0.05, "warmup_epochs": 1,
          "milestones": [], "lr_factors": [], "eval_every": 1, "crop_pad": 2, "deterministic": True, "holdout": 0.2}
SHOTS = {"many": 20, "few": 5}


def _cli(*args, ok=True):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MLFLOW_TRACKING_URI")}
    r = subprocess.run([sys.executable, "-m", "finetail.cli", *args], capture_output=True, text=True, env=env,
                       timeout=600)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    """A long-tailed array manifest (30, 10, 4 training images) and an LDAM-DRW cell trained
    on it with a held-out slice, its model saved."""
    root = tmp_path_factory.mktemp("posthoc")
    x, y = toy_images(30, 3, seed=0)
    keep = np.concatenate([np.flatnonzero(y == c)[:n] for c, n in enumerate((30, 10, 4))])
    xt, yt = toy_images(8, 3, seed=1)
    split = np.array(["train"] * len(keep) + ["test"] * len(yt), dtype=object)
    write_array_dataset(root / "data", np.concatenate([x[keep], xt]), np.concatenate([y[keep], yt]),
                        ["c0", "c1", "c2"], split)
    manifest = root / "data" / "manifest.parquet"
    # scale 5 (not 30): LDAM's unit-norm class vectors (the official NormedLinear) learn fast, and
    # at s = 30 this toy cell saturates on one class (confidence 1), where no tau moves anything
    spec = {"recipe": RECIPE, "loss": {"type": "ldam", "drw_epoch": 1, "scale": 5}, "shots": SHOTS}
    common = ["--manifest", str(manifest), "--study-dir", str(root / "study"), "--device", "cpu"]
    _cli("train", *common, "--spec", json.dumps(spec), "--out-dir", str(root / "cell"),
         "--checkpoint", str(root / "ck" / "cell.pt"), "--save-model", str(root / "cell" / "model.pt"),
         "--rule", "cbloss", "--wildcards", json.dumps({"loss": "ldam_drw", "seed": "0"}))
    return {"root": root, "manifest": manifest, "common": common, "dir": root / "cell", "spec": spec,
            "metrics": json.loads((root / "cell" / "metrics.json").read_text())}


def _posthoc(cell, model_dir, out, method, tau, ok=True):
    return _cli("posthoc", *cell["common"], "--model", str(model_dir / "model.pt"),
                "--cell-metrics", str(model_dir / "metrics.json"), "--method", method, "--tau", tau,
                "--out-dir", str(cell["root"] / out), "--rule", "posthoc",
                "--wildcards", json.dumps({"method": method, "seed": "0"}), ok=ok)


def _run(cell, run_id):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cell['root'] / 'study' / 'mlflow.db'}").get_run(run_id)


@pytest.mark.slow
def test_posthoc_logit_adjust_auto_is_a_child_run_that_keeps_the_backbone(cell):
    model = cell["dir"] / "model.pt"
    before = file_sha256(model)
    _posthoc(cell, cell["dir"], "la_auto", "logit_adjust", "auto")
    out = json.loads((cell["root"] / "la_auto" / "metrics.json").read_text())
    saved = torch.load(model, weights_only=True)
    assert file_sha256(model) == before and out["start_backbone_sha256"] == state_digest(saved["backbone"])
    assert out["parent_run_id"] == cell["metrics"]["run_id"]
    assert out["inputs"]["model_sha256"] == cell["metrics"]["model_sha256"] == before
    assert out["inputs"]["manifest_sha256"] == cell["metrics"]["inputs"]["manifest_sha256"]
    ph = out["posthoc"]
    assert ph["method"] == "logit_adjust" and ph["source"] == "holdout" and ph["tau"] in ph["grid"]
    assert ph["balanced_acc"][ph["grid"].index(ph["tau"])] == max(ph["balanced_acc"])
    assert ph["holdout_images"] == 6 + 2 + 1  # round(0.2 n) of 30, 10, 4
    assert out["num_train"] == cell["metrics"]["num_train"] == 44 - 9
    for k in ("top1_error", "balanced_acc", "many_acc", "medium_acc", "few_acc", "ece"):
        assert k in out["final"]
    assert (cell["root"] / "la_auto" / "per_class.csv").is_file() and (cell["root"] / "la_auto" / "tau.csv").is_file()
    run = _run(cell, out["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == cell["metrics"]["run_id"]
    assert run.data.tags["finetail.rule"] == "posthoc" and run.data.tags["finetail.wildcard.method"] == "logit_adjust"
    assert run.data.tags["finetail.output.metrics.json.sha256"] == file_sha256(cell["root"] / "la_auto" / "metrics.json")
    assert run.data.metrics["posthoc_tau"] == ph["tau"] and run.info.status == "FINISHED"


def _evaluate(cell, model_dir, method, tau):
    """What ``finetail posthoc`` computes, without its run (in this process: no start-up)."""
    import argparse

    from finetail.posthoc_job import evaluate_cell, posthoc_spec

    a = argparse.Namespace(manifest=str(cell["manifest"]), model=str(model_dir / "model.pt"),
                           cell_metrics=str(model_dir / "metrics.json"), method=method, tau=tau, tau_grid="0:2:0.1")
    return evaluate_cell(a, posthoc_spec(a), torch.device("cpu"))


@pytest.mark.slow
def test_posthoc_at_tau_zero_reproduces_the_cells_own_numbers(cell):
    res = _evaluate(cell, cell["dir"], "logit_adjust", "0")
    assert (res["choice"].source, res["choice"].tau) == ("given", 0.0)
    for k in ("top1_error", "balanced_acc", "ece"):
        assert res["metrics"][k] == pytest.approx(cell["metrics"]["final"][k], rel=1e-9, abs=1e-12)
    shifted = _evaluate(cell, cell["dir"], "logit_adjust", "3")["metrics"]  # a large tau moves the predictions
    assert shifted["ece"] != res["metrics"]["ece"]


@pytest.mark.slow
def test_tau_norm_of_a_cosine_head_is_refused(cell):
    with pytest.raises(UserError, match="normalises them itself"):
        _evaluate(cell, cell["dir"], "tau_norm", "1")


@pytest.mark.slow
def test_crt_retrains_only_the_head_and_tau_norm_applies_to_its_model(cell):
    root = cell["root"]
    spec = crt_spec(cell["spec"], epochs=2)
    _cli("train", *cell["common"], "--spec", json.dumps(spec), "--out-dir", str(root / "crt"),
         "--checkpoint", str(root / "ck" / "crt.pt"), "--save-model", str(root / "crt" / "model.pt"),
         "--init-model", str(cell["dir"] / "model.pt"), "--rule", "crt", "--wildcards", json.dumps({"seed": "0"}))
    crt = json.loads((root / "crt" / "metrics.json").read_text())
    old = torch.load(cell["dir"] / "model.pt", weights_only=True)
    new = torch.load(root / "crt" / "model.pt", weights_only=True)
    assert state_digest(new["backbone"]) == state_digest(old["backbone"]) == crt["start_backbone_sha256"]
    assert "head.bias" in new["model"] and "head.bias" not in old["model"]  # a new linear head
    assert not torch.equal(new["model"]["head.weight"], old["model"]["head.weight"])
    assert crt["parent_run_id"] == cell["metrics"]["run_id"]
    _posthoc(cell, root / "crt", "tn_crt", "tau_norm", "auto")
    out = json.loads((root / "tn_crt" / "metrics.json").read_text())
    assert out["parent_run_id"] == crt["run_id"] and out["posthoc"]["source"] == "holdout"
    assert out["start_backbone_sha256"] == crt["start_backbone_sha256"]


@pytest.mark.slow
def test_posthoc_refuses_a_model_that_is_not_the_cells(cell, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text((cell["dir"] / "metrics.json").read_text())
    state = torch.load(cell["dir"] / "model.pt", weights_only=True)
    state["model"]["head.weight"] = state["model"]["head.weight"] + 1
    torch.save(state, other / "model.pt")
    with pytest.raises(UserError, match="is not the model"):
        _evaluate(cell, other, "logit_adjust", "1")
