"""A reduced study through a real Slurm: the workflow profile, its per-rule resources, DDP.

Needs a running single-node Slurm (``.ci/slurm-local install && .ci/slurm-local start``,
which ``.ci/run`` does). Without one the test is skipped, except under CI, where it fails.
"""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from helpers import PROFILE, require_slurm

pytestmark = pytest.mark.slow

RECIPE = {"model": "resnet8", "width": 4, "epochs": 2, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1,
          "milestones": [1], "lr_factors": [0.1], "eval_every": 1, "crop_pad": 2}
STUDY = {
    "study": "slurm",
    "world": {"seed": 0, "image_size": 16},
    "datasets": {
        "gen10": {"kind": "world", "train_per_class": 30, "test_per_class": 8},
        "generic": {"kind": "world", "train_per_class": 10, "test_per_class": 4},
        "cub200": {"kind": "world", "train_per_class": 10, "test_per_class": 4},
    },
    "cbloss": {
        "datasets": ["gen10"],
        "imbalance": [10],
        "losses": {"softmax": {"type": "softmax"}, "cb_focal": {"type": "focal", "beta": 0.99, "gamma": 0.5}},
        "recipe": RECIPE,
    },
    "transfer": {
        "sources": {"generic": ["generic"]},
        "targets": ["cub200"],
        "features": {"model": "generic"},
        "similarity": {"min_source_images": 2},
        "pretrain": {"recipe": RECIPE},
        "finetune": {"recipe": RECIPE | {"epochs": 1}, "scratch": False},
    },
    "shots": {"many": 20, "few": 5},
}


def slurm_jobs(workdir: Path) -> dict[str, dict]:
    """Slurm's record of the jobs submitted from ``workdir``: comment (rule_<rule>[_wildcards_...]) -> fields."""
    r = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=True)
    jobs = {}
    for line in r.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if fields.get("WorkDir") == str(workdir) and fields.get("Comment", "").startswith("rule_"):
            jobs[fields["Comment"]] = fields
    return jobs


@pytest.fixture(scope="module")
def slurm_study(tmp_path_factory):
    require_slurm("the Slurm test")
    work = tmp_path_factory.mktemp("slurm").resolve()
    cfg = work / "study.yaml"
    cfg.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
           "--configfile", str(cfg), "--workflow-profile", str(PROFILE),
           # no accounting on the test cluster: ask squeue, and start polling at once
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2", "--jobs", "8"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-5000:]
    return work, log


def test_every_job_went_through_slurm(slurm_study):
    work, log = slurm_study
    jobs = slurm_jobs(work)
    rules = sorted({c.removeprefix("rule_").split("_wildcards_")[0] for c in jobs})
    assert rules == ["cbloss", "features", "finetune", "generate_world", "longtail", "pool_source", "pretrain",
                     "report", "similarity", "transferability"]
    assert all(f["JobState"] == "COMPLETED" for f in jobs.values()), {c: f["JobState"] for c, f in jobs.items()}
    assert log.count("has been submitted with SLURM jobid") == len(jobs) == 14
    res = work / "results" / "slurm"
    for path in ("cbloss/gen10/if10/softmax/seed0/metrics.json", "cbloss/gen10/if10/cb_focal/seed0/metrics.json",
                 "pretrain/generic/seed0/model.pt", "finetune/generic/cub200/seed0/metrics.json", "report/summary.md"):
        assert (res / path).exists(), path


def test_gpu_jobs_request_gpus_and_cpu_jobs_do_not(slurm_study):
    """What Slurm was asked for is the profile's per-rule resources: GPUs only for GPU jobs."""
    work, _ = slurm_study
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]
    for comment, f in slurm_jobs(work).items():
        rule = comment.removeprefix("rule_").split("_wildcards_")[0]
        want = profile[rule]
        gpus = want.get("gpu")
        assert f.get("TresPerJob") == (f"gres:gpu:{gpus}" if gpus else None), (rule, f.get("TresPerJob"))
        tres = dict(kv.split("=") for kv in f["TRES"].split(","))
        mem_mb = float(tres["mem"][:-1]) * {"M": 1, "G": 1024, "T": 1024**2}[tres["mem"][-1]]
        assert mem_mb == want["mem_mb"], (rule, tres)
        assert int(tres["cpu"]) == want.get("cpus_per_task", 1), (rule, tres)
        assert f["TimeLimit"] != "UNLIMITED", rule


def test_pretraining_ran_distributed_over_its_gpus(slurm_study):
    """The profile gives pretrain 4 GPUs; the job ran 4 DDP processes (gloo on this CPU)."""
    work, _ = slurm_study
    rec = json.loads((work / "results" / "slurm" / "pretrain" / "generic" / "seed0" / "metrics.json").read_text())
    assert rec["world_size"] == 4
    log = (work / "logs" / "slurm" / "pretrain" / "generic" / "seed0.log").read_text()
    assert "relaunching under torchrun with 4 processes" in log


def test_one_finished_mlflow_run_per_training_job(slurm_study):
    work, _ = slurm_study
    con = sqlite3.connect(work / "results" / "slurm" / "mlflow.db")
    rows = con.execute(
        "select t.value, r.status from runs r join tags t on t.run_uuid = r.run_uuid where t.key = 'finetail.rule'"
    ).fetchall()
    con.close()
    assert sorted(rows) == sorted([("cbloss", "FINISHED")] * 2 + [("pretrain", "FINISHED"), ("finetune", "FINISHED")])
