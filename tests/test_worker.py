"""The warm local worker (finetail.worker): a job forked from it ends as it would in-process
(outputs, numbers, exit codes, signals), and nothing is left behind when it or Snakemake ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import ROOT, assert_same_weights, write_toy_manifest
from helpers import kill_after_epoch

from finetail.training.checkpoint import load_checkpoint
from finetail.worker import ENV, LocalWorker, socket_path, starting_path, wanted

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker's tests read /proc"),
              pytest.mark.slow]  # every test starts a worker or a training subprocess

SPEC = {
    "recipe": {"model": "resnet8", "width": 8, "epochs": 10, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1,
               "milestones": [7], "lr_factors": [0.1], "eval_every": 3, "crop_pad": 2, "deterministic": True},
    "loss": {"type": "focal", "beta": 0.99, "gamma": 0.5},
    "shots": {"many": 100, "few": 20},
}
TIMING = {"images_per_s", "data_wait_frac"}  # history.csv columns that time the run


def _start(folder: Path) -> LocalWorker:
    w = LocalWorker(str(folder / "w.sock"), folder / "worker.log")
    w.start()
    assert w.wait_ready(300), w.log.read_text()
    return w


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = _start(tmp_path_factory.mktemp("worker"))
    yield w
    assert w.stop() == 0, w.log.read_text()
    assert not os.path.exists(w.path)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_toy_manifest(tmp_path_factory.mktemp("data"), 150, 20, ("a", "b", "c"))


def _env(socket: str | None) -> dict:
    """A job's environment as Snakemake gives it (threads: 1), with or without the worker."""
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **{ENV: socket or "off"})


def _train_cmd(manifest: Path, tmp: Path, name: str, spec: dict = SPEC) -> list[str]:
    return [sys.executable, "-m", "finetail.cli", "train", "--manifest", str(manifest), "--spec", json.dumps(spec),
            "--out-dir", str(tmp / name), "--checkpoint", str(tmp / name / "ck" / "last.pt"),
            "--study-dir", str(tmp / "study"), "--rule", "test", "--wildcards", json.dumps({"name": name}),
            "--save-model", str(tmp / name / "model.pt"), "--device", "cpu"]


def _run(cmd: list[str], socket: str | None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(socket), timeout=300, check=False, **kw)


def _jobs_in_log(w: LocalWorker) -> int:
    return w.log.read_text().count(": exit ")


# --------------------------------------------------------------------------- small pieces
def test_socket_path_is_per_study_and_fits_af_unix(tmp_path):
    assert socket_path(tmp_path / "results" / "s") == str(tmp_path / "results" / "s" / ".worker.sock")
    deep = tmp_path / ("d" * 120) / "results" / "s"
    p = socket_path(deep)
    assert len(os.fsencode(p)) <= 107 and p != socket_path(tmp_path / ("e" * 120) / "results" / "s")
    assert oct(os.stat(os.path.dirname(p)).st_mode & 0o777) == "0o700"


def test_wanted_unless_switched_off():
    assert wanted({}) and wanted({ENV: "/tmp/x.sock"})
    assert not any(wanted({ENV: v}) for v in ("off", "0", "", "OFF", "false"))


# --------------------------------------------------------------------------- one job
def test_worker_is_single_threaded_and_relays_streams_and_exit_codes(worker, tmp_path):
    assert len(os.listdir(f"/proc/{worker.proc.pid}/task")) == 1  # no thread pool to inherit
    before = _jobs_in_log(worker)
    good = [sys.executable, "-m", "finetail.cli", "check-config", str(ROOT / "config.yaml")]
    bad = [sys.executable, "-m", "finetail.cli", "check-config", str(tmp_path / "missing.yaml")]
    for cmd, code in ((good, 0), (bad, 2)):
        warm, cold = _run(cmd, worker.path), _run(cmd, None)
        assert warm.returncode == cold.returncode == code
        assert warm.stdout == cold.stdout
        assert warm.stderr.split("] ")[-1] == cold.stderr.split("] ")[-1]  # the same error (after its time stamp)
        assert "in-process" not in warm.stderr
    assert _jobs_in_log(worker) == before + 2


def test_worker_and_in_process_give_identical_results(worker, manifest, tmp_path):
    spec = SPEC | {"recipe": SPEC["recipe"] | {"epochs": 4}}
    out = {}
    for mode, socket in (("worker", worker.path), ("inprocess", None)):
        before = _jobs_in_log(worker)
        r = _run(_train_cmd(manifest, tmp_path / mode, "job", spec), socket)
        assert r.returncode == 0, r.stderr
        assert "in-process" not in r.stderr
        assert _jobs_in_log(worker) == before + (socket is not None)
        out[mode] = tmp_path / mode / "job"
    a, b = (json.loads((out[m] / "metrics.json").read_text()) for m in ("worker", "inprocess"))
    for key in ("final", "num_train", "num_classes", "config_digest", "inputs", "epochs", "precision", "device",
                "torch", "start_backbone_sha256", "git_commit"):
        assert a[key] == b[key], key
    assert a["run_id"] != b["run_id"]
    pd.testing.assert_frame_equal(*(pd.read_csv(out[m] / "per_class.csv") for m in ("worker", "inprocess")))
    ha, hb = (pd.read_csv(out[m] / "history.csv") for m in ("worker", "inprocess"))
    keep = [c for c in ha.columns if c not in TIMING]
    pd.testing.assert_frame_equal(ha[keep], hb[keep])
    assert_same_weights(*(torch.load(out[m] / "model.pt", weights_only=True)["model"] for m in ("worker", "inprocess")))
    ka, kb = (load_checkpoint(out[m] / "ck" / "last.pt") for m in ("worker", "inprocess"))
    assert ka["key"] == kb["key"]  # the same resume key

    from mlflow.tracking import MlflowClient

    for mode in ("worker", "inprocess"):  # one run per job
        client = MlflowClient(f"sqlite:///{tmp_path / mode / 'study' / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert [r.info.status for r in runs] == ["FINISHED"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_signal_through_the_worker_checkpoints_and_resumes(worker, manifest, tmp_path, sig):
    ck = tmp_path / "killed" / "ck" / "last.pt"
    rc, out, _ = kill_after_epoch(_train_cmd(manifest, tmp_path, "killed"), ck, sig, env=_env(worker.path))
    assert "in-process" not in out
    if sig == signal.SIGTERM:
        assert rc == 143, out  # the job checkpointed and exited on its own
        assert "SIGTERM received" in out
    else:
        assert rc == -signal.SIGKILL
        _wait_for(lambda: "its client is gone; SIGKILL" in worker.log.read_text(), "the worker to kill the job")
    state = load_checkpoint(ck)
    killed_at, run_id = state["epoch"], json.loads(state["extra"])["run_id"]
    assert killed_at < SPEC["recipe"]["epochs"] - 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'study' / 'mlflow.db'}")
    if sig == signal.SIGTERM:
        assert client.get_run(run_id).info.status == "KILLED"
    r = _run(_train_cmd(manifest, tmp_path, "killed"), worker.path)
    assert r.returncode == 0, r.stderr
    assert f"resuming from checkpoint {ck} at epoch {killed_at + 1}" in r.stderr
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    r = _run(_train_cmd(manifest, tmp_path, "clean"), None)  # in-process, never interrupted
    assert r.returncode == 0, r.stderr
    assert_same_weights(*(torch.load(tmp_path / n / "model.pt", weights_only=True)["model"] for n in ("clean", "killed")))


def _wait_for(cond, what: str, timeout: float = 30.0) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_job_whose_worker_died_runs_in_process(manifest, tmp_path):
    w = _start(tmp_path / "w")
    ck = tmp_path / "job" / "ck" / "last.pt"
    proc = subprocess.Popen(_train_cmd(manifest, tmp_path, "job"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(w.path))
    _wait_for(lambda: ck.exists() and load_checkpoint(ck)["epoch"] >= 1, "a checkpoint", 120)
    job = int(w.log.read_text().split("job ")[-1].split(":")[0])
    w.proc.kill()  # the worker dies mid-job: the job dies with it, the client says so and ends
    w.proc.wait()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and "ended before job" in out, out
    _wait_for(lambda: not os.path.exists(f"/proc/{job}") or _zombie(job), "the orphaned job to end")
    assert os.path.exists(w.path)  # a dead worker's socket: refused connections
    r = _run(_train_cmd(manifest, tmp_path, "job"), w.path)
    assert r.returncode == 0, r.stderr
    assert "running in-process" in r.stderr and "resuming from checkpoint" in r.stderr
    r = _run([sys.executable, "-m", "finetail.cli", "check-config", str(ROOT / "config.yaml")], str(tmp_path / "none"))
    assert r.returncode == 0 and "no worker at" in r.stderr


def test_a_job_started_while_the_worker_imports_waits_for_it(tmp_path):
    w = LocalWorker(str(tmp_path / "w.sock"), tmp_path / "worker.log")
    w.start()  # no wait_ready: the job below starts while the worker imports torch
    try:
        assert not os.path.exists(w.path) and os.path.exists(starting_path(w.path))
        r = _run([sys.executable, "-m", "finetail.cli", "check-config", str(ROOT / "config.yaml")], w.path)
        assert r.returncode == 0 and "in-process" not in r.stderr, r.stderr
        assert _jobs_in_log(w) == 1 and not os.path.exists(starting_path(w.path))
    finally:
        assert w.stop() == 0, w.log.read_text()
    # a worker that died while importing is not waited for
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Path(starting_path(str(tmp_path / "x.sock"))).write_text(f"{dead.pid}\n")
    r = _run([sys.executable, "-m", "finetail.cli", "check-config", str(ROOT / "config.yaml")], str(tmp_path / "x.sock"))
    assert r.returncode == 0 and f"(pid {dead.pid}) is gone: running in-process" in r.stderr, r.stderr


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_worker_refuses_a_client_it_cannot_stand_for(worker):
    cmd = [sys.executable, "-m", "finetail.cli", "check-config", str(ROOT / "config.yaml")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(worker.path), check=False,
                       preexec_fn=lambda: os.umask(0o077))
    assert r.returncode == 0 and "umask differs" in r.stderr and "running in-process" in r.stderr
    # OpenBLAS would start threads in the forked job before it forks its tracker: not in the worker
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(worker.path) | {"OPENBLAS_NUM_THREADS": "2"},
                       check=False)
    assert r.returncode == 0 and "2 BLAS threads" in r.stderr and "running in-process" in r.stderr


# --------------------------------------------------------------------------- the workflow
def _study(name: str, epochs: int) -> dict:
    """test_workflow's tiny study, long-tail half only, one imbalance factor."""
    from helpers import TINY

    cb = TINY["cbloss"] | {"imbalance": [4], "recipe": TINY["cbloss"]["recipe"] | {"epochs": epochs}}
    keep = {k: v for k, v in TINY.items() if k not in ("cbloss_natural", "transfer")}
    return keep | {"study": name, "datasets": {"gen10": TINY["datasets"]["gen10"]}, "cbloss": cb}


def _snakemake(work: Path, config: dict, socket_env: str | None = None, **kw) -> subprocess.Popen:
    (work / "study.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ)
    env.pop(ENV, None)
    if socket_env is not None:
        env[ENV] = socket_env
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "study.yaml"), "--cores", "2"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw)


def _processes_in(work: Path) -> list[str]:
    """Processes whose command line names ``work`` or whose working directory lies in it."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{d}/cwd")
        except OSError:
            continue
        if (str(work) in cmdline or cwd == str(work) or cwd.startswith(str(work) + "/")) and not _zombie(int(d)):
            found.append(f"{d}: {cmdline}")
    return found


@pytest.mark.slow
def test_study_tables_identical_with_and_without_the_worker(tmp_path):
    tables = {}
    for mode, env in (("worker", None), ("inprocess", "off")):
        work = tmp_path / mode
        work.mkdir()
        proc = _snakemake(work, _study("wk", 3), env)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        log = work / "logs" / "wk" / "worker" / "worker.log"
        if mode == "worker":
            assert log.read_text().count(": train ") >= 1 and "stopped" in log.read_text()
        else:
            assert not log.exists()
        assert _processes_in(work) == []
        tables[mode] = {str(p.relative_to(work)): p.read_bytes() for p in (work / "results").rglob("cbloss_*.csv")
                        if "report" in p.parts and p.name != "cbloss_cells.csv"}  # cells: run ids
    assert tables["worker"] and tables["worker"] == tables["inprocess"]


@pytest.mark.slow
def test_snakemake_interrupted_with_sigint_leaves_no_worker(tmp_path):
    # Long enough jobs (about 15 s each) that one runs in the worker when Ctrl-C comes.
    proc = _snakemake(tmp_path, _study("ctrlc", 120), start_new_session=True)
    log = tmp_path / "logs" / "ctrlc" / "worker" / "worker.log"
    try:
        _wait_for(lambda: log.exists() and ": train " in log.read_text() and any((tmp_path / "results").rglob("last.pt")),
                  "a training job in the worker", 300)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C on the terminal: snakemake and its jobs' clients
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    _wait_for(lambda: _processes_in(tmp_path) == [], "no process of the study left", 15)
    text = log.read_text()
    assert "stopped" in text, text
    assert not (tmp_path / "results" / "ctrlc" / ".worker.sock").exists()
