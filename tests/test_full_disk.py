"""A full device (issue 26) on a real tmpfs: a training job whose results folder's file system
fills up stops with one line naming the folder whose device is full and saying that nothing
was lost, not a storm of SQLAlchemy tracebacks; Snakemake shows that line; a rerun once there
is room finishes every job into one FINISHED MLflow run each, and audit finds nothing changed.

Mounting a tmpfs needs root (CI runs as root): elsewhere these tests are skipped, under CI they fail.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from finetail.provenance import audit, audit_exit_code

from conftest import write_toy_manifest
from helpers import fill, run_until_epoch, snakemake, tmpfs

pytestmark = pytest.mark.slow

ONE_LINE = re.compile(r"error: the device holding (\S+) is full \(([^)]*)\); nothing was lost: rerun when there is room")
RECIPE = {"model": "resnet8", "width": 4, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1, "eval_every": 1,
          "crop_pad": 2, "deterministic": True}


def _runs(study: Path) -> list:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, run_view_type=ViewType.ALL)


def _the_one_line(out: str, device: Path) -> Path:
    """``out`` holds no traceback, and ends with the full device's line, its only error line:
    the folder that line names (on ``device``)."""
    lines = out.strip().splitlines()
    assert "Traceback" not in out and "sqlalchemy" not in out.lower(), out[-3000:]
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], out[-3000:]
    m = ONE_LINE.search(lines[-1])
    assert m, lines[-1]
    folder = Path(m[1])
    assert folder.is_relative_to(device), folder
    assert m[2] in ("database or disk is full", "No space left on device")
    return folder


def test_a_training_job_whose_device_fills_up_stops_with_one_line_and_resumes(tmp_path):
    manifest = write_toy_manifest(tmp_path / "data", 24, 10)
    with tmpfs(tmp_path / "fs", 8 * 1024) as fs:
        study, job = fs / "study", fs / "study" / "job"
        spec = {"recipe": RECIPE | {"epochs": 60, "milestones": [50], "lr_factors": [0.1]},
                "loss": {"type": "softmax"}, "shots": {"many": 100, "few": 20}}
        cmd = [sys.executable, "-m", "finetail.cli", "train", "--manifest", str(manifest), "--spec", json.dumps(spec),
               "--out-dir", str(job / "out"), "--checkpoint", str(job / "ck" / "last.pt"), "--study-dir", str(study),
               "--rule", "test", "--wildcards", json.dumps({"name": "job"}), "--save-model", str(job / "out" / "model.pt"),
               "--device", "cpu"]
        fillers = []
        rc, out, state = run_until_epoch(cmd, job / "ck" / "last.pt", lambda proc: fillers.append(fill(fs)), min_epoch=1)
        assert rc == 2, out
        _the_one_line(out, fs)
        assert state["epoch"] < spec["recipe"]["epochs"] - 1  # it stopped mid-training
        assert not (job / "out" / "metrics.json").exists()

        fillers[0].unlink()  # room again: the rerun continues the job and its MLflow run
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert f"resuming from checkpoint {job / 'ck' / 'last.pt'}" in r.stderr
        runs = _runs(study)
        assert [run.info.status for run in runs] == ["FINISHED"]
        assert json.loads((job / "out" / "metrics.json").read_text())["run_id"] == runs[0].info.run_id
        rows = audit(study)
        assert rows and audit_exit_code(rows) == 0


STUDY = {
    "study": "full",
    "world": {"seed": 0, "image_size": 16},
    "datasets": {"gen10": {"kind": "world", "train_per_class": 20, "test_per_class": 5}},
    "cbloss": {"datasets": ["gen10"], "imbalance": [10], "losses": {"softmax": {"type": "softmax"}},
               "recipe": RECIPE | {"epochs": 2, "milestones": [1], "lr_factors": [0.1]}},
    "shots": {"many": 15, "few": 5},
}


def test_snakemake_shows_the_one_line_and_the_rerun_with_room_finishes(tmp_path):
    work = tmp_path / "work"
    with tmpfs(work / "results", 16 * 1024) as results:
        longtail = "results/full/longtail/gen10_if10/rep0/manifest.parquet"
        r = snakemake(work, STUDY, longtail)  # the data, with room
        assert r.returncode == 0, r.stderr[-3000:]
        filler = fill(results)
        r = snakemake(work, STUDY)
        assert r.returncode != 0
        log = (work / "logs" / "full" / "cbloss" / "gen10" / "if10" / "softmax" / "seed0.log").read_text()
        assert _the_one_line(log, results).is_relative_to(results / "full")
        line = log.strip().splitlines()[-1]
        assert line.split("] ", 1)[1] in r.stdout + r.stderr  # Snakemake shows it (show-failed-logs)
        assert "Traceback" not in r.stdout + r.stderr and "Error in rule cbloss" in r.stderr
        assert "finetail worker not started" in r.stderr  # its files could not be written: jobs ran in-process

        filler.unlink()
        r = snakemake(work, STUDY)
        assert r.returncode == 0, r.stderr[-3000:]
        runs = _runs(results / "full")
        assert sorted((run.data.tags["finetail.rule"], run.info.status) for run in runs) == [("cbloss", "FINISHED")]
        rows = audit(results / "full")
        assert rows and audit_exit_code(rows) == 0
