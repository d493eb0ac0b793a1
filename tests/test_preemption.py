"""A real `finetail train` process killed mid-training resumes from its checkpoint when rerun,
continues the same MLflow run, and ends with exactly the weights of an uninterrupted run."""

import json
import signal
import subprocess
import sys

import pytest
import torch


from conftest import assert_same_weights, write_toy_manifest
from helpers import kill_after_epoch

pytestmark = pytest.mark.slow  # starts training subprocesses

SPEC = {
    "recipe": {"model": "resnet8", "width": 8, "epochs": 10, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1,
               "milestones": [7], "lr_factors": [0.1], "eval_every": 3, "crop_pad": 2, "deterministic": True},
    "loss": {"type": "focal", "beta": 0.99, "gamma": 0.5},
    "shots": {"many": 100, "few": 20},
}


@pytest.fixture
def manifest(tmp_path):
    return write_toy_manifest(tmp_path / "data", 150, 20, ("a", "b", "c"))


def _cmd(manifest, tmp_path, name):
    return [sys.executable, "-m", "finetail.cli", "train", "--manifest", str(manifest), "--spec", json.dumps(SPEC),
            "--out-dir", str(tmp_path / name), "--checkpoint", str(tmp_path / name / "ck" / "last.pt"),
            "--study-dir", str(tmp_path / "study"), "--rule", "test", "--wildcards", json.dumps({"name": name}),
            "--save-model", str(tmp_path / name / "model.pt"), "--device", "cpu"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_training_resumes_to_identical_weights(manifest, tmp_path, sig):
    ck = tmp_path / "killed" / "ck" / "last.pt"
    rc, out, state = kill_after_epoch(_cmd(manifest, tmp_path, "killed"), ck, sig)
    if sig == signal.SIGTERM:
        assert rc == 143, out  # checkpointed and exited on its own
        assert "SIGTERM received" in out
    else:
        assert rc == -signal.SIGKILL
    killed_at = state["epoch"]
    assert killed_at < SPEC["recipe"]["epochs"] - 1
    run_id = json.loads(state["extra"])["run_id"]

    r = subprocess.run(_cmd(manifest, tmp_path, "killed"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming from checkpoint {ck} at epoch {killed_at + 1}" in r.stderr
    record = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert record["run_id"] == run_id  # one continued MLflow run

    r = subprocess.run(_cmd(manifest, tmp_path, "clean"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a = torch.load(tmp_path / "clean" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)["model"]
    assert_same_weights(a, b)
    hist = (tmp_path / "killed" / "history.csv").read_text().splitlines()
    assert len(hist) == 1 + SPEC["recipe"]["epochs"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'study' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["finetail.resumed"] == "true"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))
    assert steps[0] == 0 and steps[-1] == SPEC["recipe"]["epochs"] - 1
    assert set(range(SPEC["recipe"]["epochs"])) <= set(steps)
