"""The training job's tracker runs in a forked child (tracking.TrackerProcess, issue 11 part 9):
what the child raises comes back with its type, the child outlives a SIGTERM to the process
group long enough for the job to mark its run KILLED, and no process is left after a job ends,
fails or is killed."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_toy_manifest

from finetail.tracking import TrackerProcess, TrackingUnavailable, sqlite_uri

pytestmark = pytest.mark.slow  # starts training subprocesses

RECIPE = {"model": "resnet8", "width": 4, "epochs": 2, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0,
          "milestones": [], "lr_factors": [], "eval_every": 1, "crop_pad": 2}
SPEC = {"recipe": RECIPE, "loss": {"type": "softmax"}, "shots": {"many": 100, "few": 20}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(db, run_id):
    from mlflow.tracking import MlflowClient

    return MlflowClient(sqlite_uri(db)).get_run(run_id).info.status


def _exited(pid, timeout=30.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # ended, not yet reaped by its parent
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- in this process
def test_an_unreachable_server_raises_tracking_unavailable_here():
    uri = f"http://127.0.0.1:{_free_port()}"
    with TrackerProcess(uri, "e") as t:
        for _ in range(2):  # at ready() and at every call after it
            with pytest.raises(TrackingUnavailable, match=f"cannot reach the MLflow tracking server {uri}"):
                t.find_run("k", "/out")
    assert t.exitcode == 0


def test_an_error_in_a_call_comes_back_with_its_type_and_the_child_goes_on(tmp_path):
    from mlflow.exceptions import MlflowException

    db = tmp_path / "mlflow.db"
    with TrackerProcess(sqlite_uri(db), "e", artifact_root=tmp_path / "artifacts") as t:
        t.ready()
        assert t.uri.startswith(sqlite_uri(db)) and "timeout=60" in t.uri  # the child Tracker's
        with pytest.raises(MlflowException) as err:
            t.find_run("it's", "/out")  # a quote in the key: the filter does not parse
        assert "traceback in the tracking process" in "".join(err.value.__notes__)
        run_id = t.start("r", {"recipe": {"lr": 0.1}}, {"a": "b"})
        assert t.run_id == run_id and t.find_run("k", "/out") is None
        t.log_metrics({"loss": 1.0, "skipped": None}, step=1)
        t.end("FINISHED")
    assert t.exitcode == 0
    assert _status(db, run_id) == "FINISHED"


def test_the_child_ignores_sigterm_and_sigint_and_ends_with_the_pipe(tmp_path):
    db = tmp_path / "mlflow.db"
    t = TrackerProcess(sqlite_uri(db), "e")
    run_id = t.start("r", {}, {})
    for sig in (signal.SIGTERM, signal.SIGINT):
        os.kill(t.pid, sig)
    time.sleep(0.2)
    t.end("KILLED")  # still served
    assert _status(db, run_id) == "KILLED"
    t.close()
    assert t.exitcode == 0


def test_the_child_ends_when_its_parent_is_sigkilled(tmp_path):
    code = ("import sys, time; from finetail.tracking import TrackerProcess, sqlite_uri; "
            f"t = TrackerProcess(sqlite_uri({str(tmp_path / 'mlflow.db')!r}), 'e'); t.ready(); "
            "print(t.pid, flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    assert _exited(child, timeout=10), "the tracker outlived its parent"


# --------------------------------------------------------------------------- real jobs
def _group(pgid) -> list[int]:
    """Pids of the live (not zombie) processes of process group ``pgid``."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(d))
    return pids


def _job(tmp_path, spec=SPEC, n_train=40):
    man = write_toy_manifest(tmp_path / "data", n_train, 10)
    job = tmp_path / "job"
    cmd = [sys.executable, "-m", "finetail.cli", "train", "--manifest", str(man), "--spec", json.dumps(spec),
           "--out-dir", str(job / "out"), "--checkpoint", str(job / "ck" / "last.pt"),
           "--study-dir", str(tmp_path / "study"), "--rule", "test", "--device", "cpu"]
    # A session of its own, as Snakemake and Slurm start jobs: the group is the job's.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _run_status(tmp_path) -> str:
    run_id = json.loads((tmp_path / "job" / "ck" / "run.json").read_text())["run_id"]
    return _status(tmp_path / "study" / "mlflow.db", run_id)


@pytest.mark.parametrize("lr", [0.05, 1e6], ids=["finished", "diverged"])
def test_no_process_is_left_after_a_job_ends_or_fails(tmp_path, lr):
    proc = _job(tmp_path, {**SPEC, "recipe": {**RECIPE, "lr": lr}})
    out, _ = proc.communicate(timeout=300)
    if lr < 1:
        assert proc.returncode == 0, out
        assert _run_status(tmp_path) == "FINISHED"
    else:
        assert proc.returncode == 2, out
        assert "non-finite" in out and "Traceback" not in out
        assert _run_status(tmp_path) == "FAILED"
    assert _group(proc.pid) == []


def test_sigterm_to_the_process_group_marks_the_run_killed_and_leaves_no_process(tmp_path):
    proc = _job(tmp_path, {**SPEC, "recipe": {**RECIPE, "epochs": 30}}, n_train=300)
    ck, t0 = tmp_path / "job" / "ck" / "last.pt", time.time()
    while not ck.exists():  # the first checkpoint: training, with its SIGTERM handler, is on
        if proc.poll() is not None:
            pytest.fail("training ended before it could be killed:\n" + proc.stdout.read())
        assert time.time() - t0 < 300, "no checkpoint appeared"
        time.sleep(0.02)
    assert len(_group(proc.pid)) == 2  # the job and its tracker
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "SIGTERM received" in out
    assert _run_status(tmp_path) == "KILLED"
    assert _group(proc.pid) == []
