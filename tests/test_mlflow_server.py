"""MLflow server mode: a real `mlflow server` on 127.0.0.1 receives a reduced study's runs;
an unreachable server fails a job at once, before any training."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT
from helpers import TINY

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen(
        [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{work / 'server.db'}", "--artifacts-destination", str(work / "artifacts")],
        cwd=work, stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(120):
        try:
            with urllib.request.urlopen(uri + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start:\n" + (work / "server.log").read_text()[-2000:])
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def _study_config():
    cfg = json.loads(json.dumps(TINY))
    cfg["study"] = "served"
    for key in ("transfer", "cbloss_natural"):
        cfg.pop(key)
    cfg["datasets"] = {"gen10": cfg["datasets"]["gen10"]}
    cfg["cbloss"]["imbalance"] = [10]
    cfg["replicates"] = {"count": 1}
    return cfg


def _run(work, cfg, env):
    (work / "study.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
                           "--configfile", str(work / "study.yaml"), "--cores", "2"],
                          capture_output=True, text=True, env=env, timeout=600)


def test_study_logs_to_a_real_tracking_server(server, tmp_path):
    r = _run(tmp_path, _study_config(), dict(os.environ, MLFLOW_TRACKING_URI=server))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (tmp_path / "results" / "served" / "mlflow.db").exists()  # nothing went to the SQLite default
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server)
    exp = client.get_experiment_by_name("finetail-served")
    runs = client.search_runs([exp.experiment_id])
    seeds = [str(k) for k in range(_study_config()["replicates"]["count"])]
    assert sorted(r.data.tags["finetail.wildcard.loss"] for r in runs) == sorted(["cb_focal", "softmax"] * len(seeds))
    for run in runs:
        assert run.info.status == "FINISHED"
        record = json.loads((tmp_path / "results" / "served" / "cbloss" / "gen10" / "if10" /
                             run.data.tags["finetail.wildcard.loss"] / f"seed{run.data.tags['finetail.wildcard.seed']}" /
                             "metrics.json").read_text())
        assert record["run_id"] == run.info.run_id and record["tracking_uri"] == server
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"per_class.csv", "history.csv"}


def test_unreachable_server_fails_before_training(tmp_path):
    port = _free_port()  # nothing listens there
    cfg = _study_config()
    cfg["tracking"] = {"uri": f"http://127.0.0.1:{port}"}
    t0 = time.time()
    r = _run(tmp_path, cfg, dict(os.environ))
    assert r.returncode != 0
    log = (tmp_path / "logs" / "served" / "cbloss" / "gen10" / "if10" / "softmax" / "seed0.log").read_text()
    assert f"cannot reach the MLflow tracking server http://127.0.0.1:{port}" in log
    assert "epoch 1/" not in log  # no training happened
    assert not list((tmp_path / "results" / "served").glob("checkpoints/**/*.pt"))
    assert time.time() - t0 < 300
