"""The paper's CIFAR recipe (issue 12, section 2): the reference code's choices as recipe
options, fp32 in the paper study files, the recorded precision, and the check a report uses
to decide whether a recipe is the paper's."""

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from finetail.config import load_config
from finetail.models import build_model
from finetail.training.recipe import CBLOSS_CIFAR_RECIPE, TrainConfig, paper_recipe, precision

from conftest import ROOT, toy_images, write_toy_manifest

PAPER_FILES = ["workflow/studies/cbloss_paper_grid.yaml", "workflow/studies/paper.yaml",
               "workflow/studies/cifar10_jpeg_gpu.yaml"]


# --------------------------------------------------------------------------- the paper's recipe
@pytest.mark.parametrize("path", PAPER_FILES)
def test_paper_study_files_train_the_papers_cifar_recipe(path):
    raw = yaml.safe_load((ROOT / path).read_text())["cbloss"]["recipe"]
    filled = load_config(ROOT / path)["cbloss"]["recipe"]
    for recipe in (raw, filled):  # as written, and with the schema's defaults filled in
        match = paper_recipe(recipe, "cbloss_cifar")
        assert match.is_paper, match.reason()
        assert match.differences == [] and match.reason() == ""
    assert raw["amp"] is False  # fp32, stated in the file itself
    TrainConfig.from_dict(filled)  # and the engine accepts it


def test_the_default_study_is_a_reduced_recipe_and_says_why():
    recipe = load_config(ROOT / "config.yaml")["cbloss"]["recipe"]
    match = paper_recipe(recipe, "cbloss_cifar")
    assert not match.is_paper
    milestones = ", ".join(map(str, recipe["milestones"]))
    for diff in ("model resnet8 ≠ resnet32", f"epochs {recipe['epochs']} ≠ 200", "batch_size 64 ≠ 128", "lr 0.05 ≠ 0.1",
                 "weight_decay 0.0005 ≠ 0.0002", f"milestones [{milestones}] ≠ [160, 180]", "crop_pad 2 ≠ 4",
                 "amp true ≠ false", "shortcut subsample ≠ avgpool", "init kaiming ≠ glorot",
                 "input_norm dataset ≠ div128"):
        assert diff in match.differences, match.reason()
    assert match.reason().startswith("model resnet8 ≠ resnet32, ")


def test_settings_that_do_not_change_what_is_trained_keep_a_recipe_the_papers():
    same = {**CBLOSS_CIFAR_RECIPE, "seed": 3, "eval_every": 2, "compile": True, "num_workers": 4,
            "deterministic": True, "warmup_epochs": 5, "lr": 0.1, "milestones": (160, 180)}
    assert paper_recipe(same).is_paper
    # one changed schedule value, precision or reference choice is enough to say no
    for key, value in (("lr_factors", [0.1, 0.01]), ("amp", True), ("shortcut", "subsample"),
                       ("budget_images", 50000), ("nesterov", True), ("flip", False)):
        match = paper_recipe({**CBLOSS_CIFAR_RECIPE, key: value})
        assert not match.is_paper and len(match.differences) == 1 and match.differences[0].startswith(key + " ")
    with pytest.raises(ValueError, match="unknown paper recipe"):
        paper_recipe(CBLOSS_CIFAR_RECIPE, "cbloss_imagenet")


def test_recipe_helpers_stay_torch_free():
    code = ("import sys; from finetail.training.recipe import paper_recipe, CBLOSS_CIFAR_RECIPE; "
            "paper_recipe(CBLOSS_CIFAR_RECIPE); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


# --------------------------------------------------------------------------- the options
@pytest.mark.parametrize("key,value", [("shortcut", "projection"), ("init", "he_normal"), ("input_norm", "per_image")])
def test_unknown_option_values_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        TrainConfig.from_dict({key: value})


def test_cifar_only_options_are_refused_for_torchvision_models():
    with pytest.raises(ValueError, match="CIFAR ResNets only"):
        TrainConfig.from_dict({"model": "tv:resnet50", "init": "glorot"})
    TrainConfig.from_dict({"model": "tv:resnet50", "input_norm": "div128"})  # input scaling applies to any model


def test_avgpool_shortcut_averages_where_subsample_picks():
    torch.manual_seed(0)
    sub = build_model("resnet8", 3, width=4, shortcut="subsample")
    torch.manual_seed(0)
    avg = build_model("resnet8", 3, width=4, shortcut="avgpool")
    down = next(b for b in avg.backbone.layers if b.stride == 2)
    x = torch.arange(2 * 4 * 5 * 5, dtype=torch.float32).view(2, 4, 5, 5)
    y = down._shortcut(x)
    assert y.shape == (2, 8, 3, 3)  # 5 px -> 3 px like the stride-2 conv, channels 4 -> 8 (2 zeros each side)
    assert torch.all(y[:, :2] == 0) and torch.all(y[:, 6:] == 0)
    assert y[0, 2, 0, 0] == x[0, 0, :2, :2].mean()  # a full 2x2 window
    assert y[0, 2, 2, 2] == x[0, 0, 4, 4]  # the odd edge: the window's one pixel inside
    assert y[0, 2, 0, 2] == x[0, 0, :2, 4].mean()
    picked = next(b for b in sub.backbone.layers if b.stride == 2)._shortcut(x)
    assert torch.equal(picked[:, 2:6], x[:, :, ::2, ::2])
    # the option changes no parameter: the same seed gives the same weights
    assert all(torch.equal(a, b) for a, b in zip(sub.state_dict().values(), avg.state_dict().values(), strict=True))


def test_glorot_init_draws_conv_and_head_kernels_from_glorot_uniform():
    torch.manual_seed(0)
    model = build_model("resnet32", 10, init="glorot")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for w in [c.weight.detach() for c in convs] + [model.head.weight.detach()]:
        fan_in = w.shape[1] * w[0, 0].numel()
        fan_out = w.shape[0] * w[0, 0].numel()
        limit = math.sqrt(6 / (fan_in + fan_out))
        assert float(w.abs().max()) <= limit
        assert float(w.std()) == pytest.approx(limit / math.sqrt(3), rel=0.25)  # uniform(-l, l) has std l / sqrt(3)
    torch.manual_seed(0)
    ours = build_model("resnet32", 10)
    w = [m for m in ours.modules() if isinstance(m, torch.nn.Conv2d)][5].weight.detach()  # He normal, fan_out
    assert float(w.std()) == pytest.approx(math.sqrt(2 / (w.shape[0] * 9)), rel=0.1)
    with pytest.raises(ValueError):
        build_model("tv:resnet18", 10, init="glorot")


def test_reference_options_train_in_fp32_with_inputs_scaled_by_128(tmp_path):
    from finetail.training.loop import train

    torch.set_num_threads(1)
    x, y = toy_images(20, 3, 16, 0)
    xt, yt = toy_images(6, 3, 16, 1)
    cfg = TrainConfig(model="resnet8", width=8, batch_size=16, lr=0.05, warmup_epochs=1, milestones=[3],
                      lr_factors=[0.1], eval_every=2, crop_pad=2, epochs=4, deterministic=True, amp=False,
                      shortcut="avgpool", init="glorot", input_norm="div128")
    res = train(cfg, x, y, xt, yt, 3, tmp_path / "ck.pt", device="cpu", log=lambda m: None)
    assert res.normalisation == {"mean": [128.0] * 3, "std": [128.0] * 3}  # (x - 128) / 128 = x / 128 - 1
    assert res.precision == "fp32"
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert 0.0 <= res.metrics["ece"] <= 1.0


def test_precision_is_bf16_with_amp_on_cuda_and_on_the_cpu_only_when_asked():
    assert precision(TrainConfig(amp=True), "cuda") == "bf16"
    assert precision(TrainConfig(amp=False), "cuda") == "fp32"
    assert precision(TrainConfig(amp=True), "cpu") == "fp32"
    assert precision(TrainConfig(amp=True, cpu_bf16=True), "cpu") == "bf16"
    assert precision(TrainConfig(amp=False, cpu_bf16=True), "cpu") == "fp32"  # amp off wins


def test_cpu_bf16_and_channels_last_train_record_and_stay_close_to_fp32(tmp_path):
    """The CPU speed options train the same recipe: bf16 autocast is recorded as the run's
    precision and learns; channels-last in fp32 computes the same function (its convolutions
    sum in another order, so the losses agree to float tolerance, not bitwise)."""
    from finetail.training.loop import train

    torch.set_num_threads(1)
    x, y = toy_images(20, 3, 16, 0)
    xt, yt = toy_images(6, 3, 16, 1)
    base = dict(model="resnet8", width=8, batch_size=16, lr=0.05, warmup_epochs=1, milestones=[3], lr_factors=[0.1],
                eval_every=4, crop_pad=2, epochs=4, deterministic=True)
    runs = {}
    for name, extra in (("fp32", {}), ("bf16", {"cpu_bf16": True}), ("channels_last", {"cpu_channels_last": True})):
        cfg = TrainConfig(**base, **extra)
        runs[name] = train(cfg, x, y, xt, yt, 3, tmp_path / name / "ck.pt", device="cpu", log=lambda m: None)
    assert [runs[n].precision for n in ("fp32", "bf16", "channels_last")] == ["fp32", "bf16", "fp32"]
    loss = {n: [h["train_loss"] for h in r.history] for n, r in runs.items()}
    assert loss["bf16"][-1] < loss["bf16"][0] and all(map(math.isfinite, loss["bf16"]))
    assert loss["channels_last"] == pytest.approx(loss["fp32"], rel=1e-3)
    assert loss["bf16"] != loss["fp32"]  # it did compute in another precision


# --------------------------------------------------------------------------- the record
def test_confidence_follows_the_losss_probability_model():
    from finetail.training.loop import confidence

    logits = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, math.log(3.0)]])
    top1 = logits.argmax(1)
    # softmax: e^z / sum e^z = 2 / (2 + 1 + 1) and 3 / (1 + 1 + 3)
    assert confidence(logits, top1, "softmax").tolist() == pytest.approx([0.5, 0.6])
    # sigmoid and focal: one sigmoid per class, 1 / (1 + e^-z) = 2/3 and 3/4
    for loss in ("sigmoid", "focal"):
        assert confidence(logits, top1, loss).tolist() == pytest.approx([2 / 3, 3 / 4])


@pytest.mark.slow
def test_a_training_job_records_ece_and_precision(tmp_path):
    """End to end: a tiny `finetail train` puts ``ece`` (in [0, 1]) and the precision in
    metrics.json, ``test_ece`` per evaluated epoch in history.csv and MLflow, and tags the run."""
    from mlflow.tracking import MlflowClient

    man = write_toy_manifest(tmp_path / "data", 20, 8)
    recipe = {"model": "resnet8", "width": 4, "epochs": 2, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1,
              "milestones": [1], "lr_factors": [0.1], "eval_every": 1, "crop_pad": 2, "deterministic": True}
    spec = {"recipe": recipe, "loss": {"type": "focal", "beta": 0.99, "gamma": 0.5}, "shots": {"many": 100, "few": 20}}
    out, study = tmp_path / "out", tmp_path / "study"
    cmd = [sys.executable, "-m", "finetail.cli", "train", "--manifest", str(man), "--spec", json.dumps(spec),
           "--out-dir", str(out), "--checkpoint", str(tmp_path / "ck" / "last.pt"), "--study-dir", str(study),
           "--rule", "test", "--wildcards", json.dumps({"name": "ece"}), "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:]

    rec = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= rec["final"]["ece"] <= 1.0
    assert rec["precision"] == "fp32"
    hist = pd.read_csv(out / "history.csv")
    assert hist["test_ece"].between(0, 1).all() and len(hist) == 2
    assert hist["test_ece"].iloc[-1] == pytest.approx(rec["final"]["ece"])

    client = MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    run = client.get_run(rec["run_id"])
    assert run.data.tags["finetail.precision"] == "fp32"
    assert run.data.metrics["final_ece"] == pytest.approx(rec["final"]["ece"])
    logged = client.get_metric_history(rec["run_id"], "test_ece")
    assert [m.step for m in logged] == [0, 1]
    np.testing.assert_allclose([m.value for m in logged], hist["test_ece"])


# --------------------------------------------------------------------------- a reused backbone
def test_the_shortcut_is_part_of_the_backbone_that_fine_tuning_and_features_reuse(tmp_path):
    from finetail.config import ConfigError
    from finetail.features import load_feature_model

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["transfer"]["pretrain"]["recipe"]["shortcut"] = "avgpool"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="shortcut"):
        load_config(tmp_path / "c.yaml")
    cfg["transfer"]["finetune"]["recipe"]["shortcut"] = "avgpool"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    load_config(tmp_path / "c.yaml")
    cfg["transfer"]["finetune"]["per_target"] = {"cub200": {"shortcut": "subsample"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="shortcut"):
        load_config(tmp_path / "c.yaml")

    # the feature network is rebuilt with the shortcut it was trained with
    torch.manual_seed(0)
    model = build_model("resnet8", 3, width=4, shortcut="avgpool")
    norm = {"mean": [128.0] * 3, "std": [128.0] * 3}
    torch.save({"model": model.state_dict(), "backbone": model.backbone.state_dict(), "normalisation": json.dumps(norm),
                "cfg": json.dumps({"recipe": {"model": "resnet8", "width": 4, "shortcut": "avgpool"}})},
               tmp_path / "model.pt")
    fm = load_feature_model(str(tmp_path / "model.pt"))
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(fm.backbone.eval()(x), model.backbone(x))


def test_an_fp32_recipe_on_cuda_turns_tf32_convolutions_off():
    from finetail.training.loop import _conv_precision

    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    try:
        _conv_precision(TrainConfig(amp=False), "cuda")
        assert conv.fp32_precision == "ieee"
        _conv_precision(TrainConfig(amp=True), "cuda")
        assert conv.fp32_precision == "tf32"  # PyTorch's default, under bf16 autocast
        conv.fp32_precision = before
        _conv_precision(TrainConfig(amp=False), "cpu")
        assert conv.fp32_precision == before  # the CPU is left alone
    finally:
        conv.fp32_precision = before
