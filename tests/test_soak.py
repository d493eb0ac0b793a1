"""bench/soak.py for real at tiny size: a one-cell study SIGKILLed twice mid-run, rerun to the
end, and checked against an uninterrupted run (one FINISHED MLflow run, same results, audit clean)."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.slow

TINY = {
    "study": "soaktiny",
    "world": {"seed": 0, "image_size": 16},
    "datasets": {"gen10": {"kind": "world", "train_per_class": 20, "test_per_class": 5}},
    "cbloss": {
        "datasets": ["gen10"],
        "imbalance": [10],
        "losses": {"softmax": {"type": "softmax"}},
        "recipe": {"model": "resnet8", "width": 4, "epochs": 6, "batch_size": 16, "lr": 0.05, "warmup_epochs": 1,
                   "milestones": [4], "lr_factors": [0.1], "eval_every": 3, "crop_pad": 2},
    },
    "shots": {"many": 15, "few": 5},
}


def test_soak_two_kills_end_in_one_finished_run_and_identical_results(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY, sort_keys=False))
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--configfile", str(cfg), "--kills", "2",
                        "--seed", "1", "--work", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    fig = json.loads(out.read_text())
    assert fig["ok"] and fig["failures"] == []
    assert 1 <= fig["kills"] <= 2
    assert fig["training_jobs"] == fig["training_jobs_reference"] == 1 and fig["same_jobs_as_reference"]
    assert fig["runs"] == 1 and fig["runs_by_status"] == {"FINISHED": 1}
    assert fig["running_runs"] == fig["duplicate_jobs"] == fig["mismatches"] == 0 and fig["jobs_compared"] == 1
    assert fig["audit_rc"] == 0
    assert f"{fig['kills']} kills" in r.stdout and "OK" in r.stdout
    assert (tmp_path / "work" / "soak" / "results" / "soaktiny" / "report" / "summary.md").exists()
