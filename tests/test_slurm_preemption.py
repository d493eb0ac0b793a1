"""A training job preempted by a real Slurm: the time-limit signal checkpoints it, Snakemake's
retry resumes it into the same MLflow run, and it ends with an uninterrupted run's weights.

The real workflow profile, with two settings of the ``cbloss`` rule changed so that a test can
wait for it: its first attempt gets a 2-minute limit (``runtime``, evaluated per attempt; the
retries get 30 minutes) and ``--signal=TERM@30`` instead of ``@300``. slurmctld checks time
limits every 30 s and sends the warning signal at the first check within 30 s of ``limit -
30 s``, so SIGTERM reaches the job's steps 60-90 s after it starts, while it trains (the
number of epochs is sized from a quick timing of this machine so that training lasts about
90 s). ``finetail train`` checkpoints the current step and exits 143, the Slurm job fails,
``retries: 2`` resubmits it, and the second Slurm job resumes from that checkpoint.

Needs a running single-node Slurm (``.ci/slurm-local install && .ci/slurm-local start``,
which ``.ci/run`` does). Without one the test is skipped, except under CI, where it fails.
"""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, assert_same_weights, toy_images
from helpers import PROFILE, require_slurm

pytestmark = pytest.mark.slow

TRAIN_SECONDS = 90  # how long the job should train uninterrupted: well past the signal window
SIGNAL = "--signal=TERM@30"
FIRST_LIMIT_MIN, RETRY_LIMIT_MIN = 2, 30
SLURMD_LOG = Path("/var/log/slurm-finetail/slurmd.log")  # where .ci/slurm-local has slurmd log
RECIPE = {"model": "resnet8", "width": 8, "batch_size": 16, "lr": 0.05, "warmup_epochs": 1, "crop_pad": 2}
JOB_LOG = "logs/preempt/cbloss/gen10/if10/softmax/seed0.log"
RESULTS = "results/preempt"
TARGET = f"{RESULTS}/cbloss/gen10/if10/softmax/seed0/metrics.json"  # the training job (no report)
DATA = f"{RESULTS}/longtail/gen10_if10/rep0/manifest.parquet"


def seconds_per_epoch() -> float:
    """One epoch of the job's recipe on 240 images of its size, one thread, on this machine now."""
    from finetail.training.loop import train
    from finetail.training.recipe import TrainConfig

    x, y = toy_images(24, num_classes=10, size=16)
    cfg = TrainConfig.from_dict({**RECIPE, "epochs": 5, "milestones": [4], "lr_factors": [0.1], "eval_every": 5})
    stamps = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ck = Path(os.environ.get("TMPDIR", "/tmp")) / f"finetail-calibrate-{os.getpid()}.pt"
        train(cfg, x, y, x[:50], y[:50], 10, ck, device="cpu", log=lambda m: None,
              on_epoch=lambda e, m: stamps.append(time.perf_counter()))
        ck.unlink(missing_ok=True)
    finally:
        torch.set_num_threads(threads)
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return gaps[len(gaps) // 2]


def study(epochs: int) -> dict:
    """One training job (a CB-loss cell on a 10-class world set, 240 training images)."""
    return {
        "study": "preempt",
        "world": {"seed": 0, "image_size": 16},
        "datasets": {"gen10": {"kind": "world", "train_per_class": 60, "test_per_class": 10}},
        "cbloss": {
            "datasets": ["gen10"],
            "imbalance": [10],
            "losses": {"softmax": {"type": "softmax"}},
            "recipe": RECIPE | {"epochs": epochs, "milestones": [int(0.7 * epochs)], "lr_factors": [0.1],
                                "eval_every": epochs},
        },
        "shots": {"many": 30, "few": 10},
    }


def slurm_jobs_of(workdir: Path) -> dict[int, dict]:
    """Every Slurm job submitted from ``workdir``: job id -> scontrol's fields."""
    r = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=True)
    jobs = {}
    for line in r.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if fields.get("WorkDir") == str(workdir):
            jobs[int(fields["JobId"])] = fields
    return jobs


def _seconds(t: str) -> int:
    """Slurm's [D-]HH:MM:SS as seconds."""
    days, _, hms = t.rpartition("-")
    h, m, s = (int(v) for v in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    require_slurm("the Slurm preemption test")
    per_epoch = seconds_per_epoch()
    epochs = min(2000, max(150, math.ceil(TRAIN_SECONDS / per_epoch)))
    base = tmp_path_factory.mktemp("preempt").resolve()
    cfg = base / "study.yaml"
    cfg.write_text(yaml.safe_dump(study(epochs), sort_keys=False))
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert "--signal=TERM@" in profile["set-resources"]["cbloss"]["slurm_extra"] and profile["retries"] >= 1
    profile["set-resources"]["cbloss"].update(
        runtime=f"{FIRST_LIMIT_MIN} if attempt == 1 else {RETRY_LIMIT_MIN}", slurm_extra=f"'{SIGNAL}'")
    (base / "profile").mkdir()
    (base / "profile" / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))

    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("MLFLOW_TRACKING_URI", None)
    snakemake = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--configfile", str(cfg)]
    work, ref = base / "slurm", base / "reference"
    work.mkdir()
    ref.mkdir()
    # the uninterrupted run of the same job, locally (one thread, as the rule asks), meanwhile
    ref_proc = subprocess.Popen([*snakemake, "--directory", str(ref), "--cores", "1", TARGET], env=env,
                                stdout=open(base / "reference.log", "w"), stderr=subprocess.STDOUT)
    # the data locally too: only the training job goes through Slurm (each Slurm job costs the
    # executor's status polling, 20-40 s, on top of its run time)
    r = subprocess.run([*snakemake, "--directory", str(work), "--cores", "1", DATA], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    t0 = time.time()
    proc = subprocess.Popen(
        [*snakemake, "--directory", str(work), "--workflow-profile", str(base / "profile"),
         "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2", "--jobs", "4", TARGET],
        env=env, stdout=open(base / "slurm.log", "w"), stderr=subprocess.STDOUT)
    # The retry rewrites the job's log: keep the first attempt's as it ends (SIGTERM line).
    first_attempt_log = None
    job_log = work / JOB_LOG
    while proc.poll() is None and time.time() - t0 < 900:
        if first_attempt_log is None and job_log.exists():
            text = job_log.read_text(errors="replace")
            if "SIGTERM received" in text:
                first_attempt_log = text
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
        ref_proc.kill()
        pytest.fail("the Slurm run took over 15 minutes:\n" + (base / "slurm.log").read_text()[-4000:])
    wall = time.time() - t0
    assert ref_proc.wait(timeout=600) == 0, (base / "reference.log").read_text()[-4000:]
    log = (base / "slurm.log").read_text()
    assert proc.returncode == 0, log[-6000:]
    return {"work": work, "ref": ref, "log": log, "first_attempt_log": first_attempt_log, "epochs": epochs,
            "per_epoch": per_epoch, "wall": wall}


def test_the_signal_checkpointed_the_first_attempt_and_the_retry_resumed(preempted):
    first = preempted["first_attempt_log"]
    assert first is not None, ("the job was not preempted while training (training too short for the signal "
                               f"window?); final log:\n{(preempted['work'] / JOB_LOG).read_text()[-3000:]}")
    assert "done:" not in first
    m = re.search(r"SIGTERM received: checkpointed (?:epoch (\d+) at iteration (\d+) of \d+|the end of epoch (\d+))", first)
    assert m, first[-2000:]
    # epoch N interrupted at iteration K resumes "at epoch N-1, iteration K"; the end of epoch N, "at epoch N"
    where = f"epoch {int(m[1]) - 1}, iteration {m[2]}" if m[1] else f"epoch {m[3]}"
    final = (preempted["work"] / JOB_LOG).read_text()
    assert f"resuming from checkpoint {RESULTS}/checkpoints/cbloss/gen10/if10/softmax/seed0/last.pt at {where} of " \
           f"{preempted['epochs']} epochs" in final, final[:3000]
    assert "done:" in final


def test_slurm_ended_the_first_attempt_and_completed_the_retry(preempted):
    work, log = preempted["work"], preempted["log"]
    ids = [int(i) for i in re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*rule_cbloss/", log)]
    assert len(ids) == 2, log[-4000:]  # one retry
    jobs = slurm_jobs_of(work)
    first, retry = jobs[ids[0]], jobs[ids[1]]
    assert first["JobState"] in ("FAILED", "TIMEOUT"), first
    assert _seconds(first["TimeLimit"]) == 60 * FIRST_LIMIT_MIN
    # the signal came with 30-60 s left (slurmctld checks every 30 s), not at the limit
    assert 50 <= _seconds(first["RunTime"]) < 60 * FIRST_LIMIT_MIN, first["RunTime"]
    assert retry["JobState"] == "COMPLETED" and _seconds(retry["TimeLimit"]) == 60 * RETRY_LIMIT_MIN, retry
    if SLURMD_LOG.exists():  # .ci/slurm-local's slurmd: its step was signalled by Slurm, not by us
        assert re.search(rf"STEP {ids[0]}\.0 ON \S+ CANCELLED", SLURMD_LOG.read_text(errors="replace"))


def test_one_finished_mlflow_run_marked_resumed(preempted):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    work, epochs = preempted["work"], preempted["epochs"]
    client = MlflowClient(f"sqlite:///{work / RESULTS / 'mlflow.db'}")
    exp = client.get_experiment_by_name("finetail-preempt")
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
    assert [(r.data.tags["finetail.rule"], r.info.status) for r in runs] == [("cbloss", "FINISHED")]
    run = runs[0]
    assert run.data.tags["finetail.resumed"] == "true"
    record = json.loads((work / RESULTS / "cbloss/gen10/if10/softmax/seed0/metrics.json").read_text())
    assert record["run_id"] == run.info.run_id
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert steps == set(range(epochs))


def test_final_weights_equal_an_uninterrupted_run(preempted):
    work, ref = preempted["work"], preempted["ref"]
    ck = "checkpoints/cbloss/gen10/if10/softmax/seed0/last.pt"
    a = torch.load(ref / RESULTS / ck, map_location="cpu", weights_only=False)
    b = torch.load(work / RESULTS / ck, map_location="cpu", weights_only=False)
    assert int(a["epoch"]) == int(b["epoch"]) == preempted["epochs"] - 1
    assert_same_weights(a["model"], b["model"])
    ma = json.loads((ref / RESULTS / "cbloss/gen10/if10/softmax/seed0/metrics.json").read_text())
    mb = json.loads((work / RESULTS / "cbloss/gen10/if10/softmax/seed0/metrics.json").read_text())
    assert ma["final"] == mb["final"]
