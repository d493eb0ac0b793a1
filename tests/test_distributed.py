"""DDP under torchrun on the CPU (gloo): `finetail train --nproc 2` is one job with one
tracked run and one set of results, and learns what a single process learns.

On the CPU BatchNorm statistics are per-rank (SyncBatchNorm is CUDA-only), so the two-process
run differs from the single-process run by the batch statistics of half-batches: its loss
curve agrees within a tolerance, not bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from finetail.distributed import rank_slice, steps_per_epoch, world_size
from finetail.training.checkpoint import load_checkpoint

from conftest import write_toy_manifest

SPEC = {
    "recipe": {"model": "resnet8", "width": 8, "epochs": 6, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1,
               "milestones": [4], "lr_factors": [0.1], "eval_every": 3, "crop_pad": 2, "deterministic": True},
    "loss": {"type": "focal", "beta": 0.99, "gamma": 0.5},
    "shots": {"many": 100, "few": 20},
}


@pytest.fixture
def manifest(tmp_path):
    return write_toy_manifest(tmp_path / "data", 64, 20, ("a", "b", "c"))  # 192 images: 6 global batches of 32, 16 per rank


def _cmd(manifest, tmp_path, name, nproc, spec=SPEC):
    return [sys.executable, "-m", "finetail.cli", "train", "--manifest", str(manifest), "--spec", json.dumps(spec),
            "--out-dir", str(tmp_path / name), "--checkpoint", str(tmp_path / name / "ck" / "last.pt"),
            "--study-dir", str(tmp_path / "study"), "--rule", "test", "--wildcards", json.dumps({"name": name}),
            "--save-model", str(tmp_path / name / "model.pt"), "--device", "cpu", "--nproc", str(nproc)]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_rank_slices_cover_the_global_batch():
    for n in (1, 7, 32, 33):
        for world in (1, 2, 3):
            parts = [rank_slice(n, r, world) for r in range(world)]
            assert parts[0].start == 0 and parts[-1].stop == n
            assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
            assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1
    assert steps_per_epoch(100, 32, 1) == 4
    assert steps_per_epoch(97, 32, 2) == 3  # a last batch of 1 image cannot feed 2 ranks: dropped
    assert steps_per_epoch(98, 32, 2) == 4
    assert world_size() == 1  # outside torchrun


@pytest.mark.slow
def test_two_processes_match_one(manifest, tmp_path):
    runs = {}
    for nproc in (1, 2):
        r = subprocess.run(_cmd(manifest, tmp_path, f"n{nproc}", nproc), capture_output=True, text=True, env=_env(),
                           timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        runs[nproc] = r.stderr
    assert "relaunching under torchrun with 2 processes" in runs[2]
    assert "rank 1/2:" in runs[2] and "rank 0/2: done" in runs[2]

    h1 = pd.read_csv(tmp_path / "n1" / "history.csv")
    h2 = pd.read_csv(tmp_path / "n2" / "history.csv")
    assert len(h1) == len(h2) == SPEC["recipe"]["epochs"]
    assert (h1["lr"] == h2["lr"]).all()  # same schedule: the global batch is the recipe's
    # Same data order, augmentation and (averaged) gradients; only BN statistics over 16
    # instead of 32 images differ. That changes the first epochs' losses by a few percent
    # (measured: 0.2% and 2.6%) and, as the trajectories drift apart, later losses by a few
    # hundredths absolute once they are small (measured: 0.126 vs 0.102 at epoch 4 of 6, where
    # the first epoch's loss is 1.23): 5% relative plus 0.04 absolute.
    np.testing.assert_allclose(h2["train_loss"], h1["train_loss"], rtol=0.05, atol=0.04)
    assert h2["train_loss"].iloc[-1] < 0.5 * h2["train_loss"].iloc[0]  # it learns

    w1 = torch.load(tmp_path / "n1" / "model.pt", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "n2" / "model.pt", weights_only=True)["model"]
    assert w1.keys() == w2.keys()  # no DDP "module." prefix
    # Relative distance of all learned parameters (measured: 0.014); the BN running
    # statistics are rank 0's half-batch averages, further off (measured: 0.066).
    params = [k for k in w1 if w1[k].is_floating_point() and "running" not in k]
    num = sum(float((w1[k] - w2[k]).norm() ** 2) for k in params)
    den = sum(float(w1[k].norm() ** 2) for k in params)
    assert (num / den) ** 0.5 < 0.05

    m1 = json.loads((tmp_path / "n1" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "n2" / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert abs(m1["final"]["top1_acc"] - m2["final"]["top1_acc"]) <= 0.1
    assert sorted(p.name for p in (tmp_path / "n2").iterdir()) == sorted(
        ["ck", "history.csv", "metrics.json", "model.pt", "per_class.csv"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'study' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("finetail")
    runs2 = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("finetail.wildcard.name") == "n2"]
    assert len(runs2) == 1  # one job, one run, however many processes
    assert runs2[0].info.run_id == m2["run_id"] and runs2[0].info.status == "FINISHED"
    assert runs2[0].data.tags["finetail.world_size"] == "2"


@pytest.mark.slow
def test_without_batch_statistics_two_processes_equal_one(manifest, tmp_path):
    """A linear probe (frozen backbone, BN in eval mode) has no per-rank batch statistics:
    there DDP must reproduce the single process up to float summation order, which checks
    the data order, the slicing, the loss scaling and the gradient averaging exactly."""
    spec = json.loads(json.dumps(SPEC))
    spec["recipe"].update(epochs=3, linear_probe=True, lr=0.5)
    for nproc in (1, 2):
        r = subprocess.run(_cmd(manifest, tmp_path, f"p{nproc}", nproc, spec), capture_output=True, text=True,
                           env=_env(), timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
    h1 = pd.read_csv(tmp_path / "p1" / "history.csv")
    h2 = pd.read_csv(tmp_path / "p2" / "history.csv")
    np.testing.assert_allclose(h2["train_loss"], h1["train_loss"], rtol=1e-5)
    np.testing.assert_array_equal(h2["train_acc"], h1["train_acc"])
    w1 = torch.load(tmp_path / "p1" / "model.pt", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "p2" / "model.pt", weights_only=True)["model"]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)
    m1 = json.loads((tmp_path / "p1" / "metrics.json").read_text())["final"]
    m2 = json.loads((tmp_path / "p2" / "metrics.json").read_text())["final"]
    assert m1["top1_error"] == m2["top1_error"]  # rank 0's evaluation = single-process evaluation


@pytest.mark.slow
def test_sigterm_to_the_torchrun_group_checkpoints_and_the_rerun_finishes(manifest, tmp_path):
    spec = json.loads(json.dumps(SPEC))
    spec["recipe"]["epochs"] = 12
    cmd = _cmd(manifest, tmp_path, "killed", 2, spec)
    ck = tmp_path / "killed" / "ck" / "last.pt"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    t0 = time.time()
    while not (ck.exists() and load_checkpoint(ck)["epoch"] >= 1):
        if proc.poll() is not None:
            pytest.fail("training ended before it could be killed:\n" + proc.stdout.read())
        assert time.time() - t0 < 300
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # what Slurm does: every process of the job
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert "rank 0/2: SIGTERM received: checkpointed" in out and "rank 1/2: SIGTERM received" in out
    state = load_checkpoint(ck)
    assert state["epoch"] < spec["recipe"]["epochs"] - 1
    run_id = json.loads(state["extra"])["run_id"]
    assert not (tmp_path / "killed" / "metrics.json").exists()

    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resuming from checkpoint" in r.stderr
    record = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert record["run_id"] == run_id  # the same MLflow run continued
    assert len(pd.read_csv(tmp_path / "killed" / "history.csv")) == spec["recipe"]["epochs"]
