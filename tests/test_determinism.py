"""Determinism: one config and seed, one machine and thread count, the same metrics.json numbers.

The training job as the DAG runs it (``finetail train``, the default ``deterministic: false``
on the CPU), twice per seed; another seed must give other numbers, or the seeds of the study
would measure nothing.
"""

import pytest
import json
import os
import subprocess
import sys

import pandas as pd

from conftest import write_toy_manifest

pytestmark = pytest.mark.slow  # starts training subprocesses

SPEC = {
    "recipe": {"model": "resnet8", "width": 8, "epochs": 3, "batch_size": 16, "lr": 0.05, "warmup_epochs": 1,
               "milestones": [2], "lr_factors": [0.1], "eval_every": 3, "crop_pad": 2},
    "loss": {"type": "focal", "beta": 0.99, "gamma": 0.5},
    "shots": {"many": 100, "few": 20},
}


def _train(manifest, tmp_path, name, seed):
    spec = {**SPEC, "recipe": {**SPEC["recipe"], "seed": seed}}
    out = tmp_path / name
    cmd = [sys.executable, "-m", "finetail.cli", "train", "--manifest", str(manifest), "--spec", json.dumps(spec),
           "--out-dir", str(out), "--checkpoint", str(out / "ck" / "last.pt"), "--study-dir", str(tmp_path / "study"),
           "--rule", "cbloss", "--wildcards", json.dumps({"name": name, "seed": str(seed)}), "--device", "cpu",
           "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MLFLOW_TRACKING_URI")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads((out / "metrics.json").read_text())


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    manifest = write_toy_manifest(tmp_path / "data", 24, 10)
    a, b = _train(manifest, tmp_path, "a", 1), _train(manifest, tmp_path, "b", 1)
    assert a["run_id"] != b["run_id"]  # two real runs ...
    assert a["final"] == b["final"]  # ... with every final number equal, to the last bit
    assert (tmp_path / "a" / "per_class.csv").read_text() == (tmp_path / "b" / "per_class.csv").read_text()
    hist_a, hist_b = _numbers(tmp_path / "a" / "history.csv"), _numbers(tmp_path / "b" / "history.csv")
    pd.testing.assert_frame_equal(hist_a, hist_b, check_exact=True)  # every epoch's loss and metrics
    c = _train(manifest, tmp_path, "c", 2)
    assert not hist_a.equals(_numbers(tmp_path / "c" / "history.csv"))  # another seed: other weights and batches


def _numbers(history):
    """A history.csv without its timing columns (images per second, time waiting for data)."""
    h = pd.read_csv(history)
    timing = [c for c in h.columns if c.endswith("_per_s") or c.endswith("_s") or c == "data_wait_frac"]
    assert "train_loss" in h.columns and "images_per_s" in timing
    return h.drop(columns=timing)
