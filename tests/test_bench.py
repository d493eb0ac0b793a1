"""The benchmarks of issue 6: bench/bench_pipeline.py (engine vs the usual DataLoader pipeline)
and bench/gpu.sh (the whole GPU check), run for real at tiny size on real CIFAR-10 JPEGs."""

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from finetail.longtail import class_counts

from conftest import require

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
TRAIN_PER_CLASS, TEST_PER_CLASS = 100, 20
LT_COUNTS = class_counts(TRAIN_PER_CLASS, 10, 100)  # [100, 59, 35, 21, 12, 7, 4, 2, 1, 1]



@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    """The first 100 training and 20 test JPEGs of each class of the real archive, same layout."""
    require(ARCHIVE.exists(), f"{ARCHIVE} not present (the clone is not beside shared/)")
    out = tmp_path_factory.mktemp("archive") / "cifar10-small.tar.gz"
    seen: Counter = Counter()
    with tarfile.open(ARCHIVE, "r:gz") as tin, tarfile.open(out, "w:gz") as tout:
        for m in tin:
            if not m.isfile():
                continue
            split, cls = m.name.split("/")[-3:-1]
            if seen[split, cls] < (TRAIN_PER_CLASS if split == "train" else TEST_PER_CLASS):
                seen[split, cls] += 1
                tout.addfile(m, tin.extractfile(m))
    assert len(seen) == 20 and sum(seen.values()) == 10 * (TRAIN_PER_CLASS + TEST_PER_CLASS)
    return out


def _run(cmd, env=None, timeout=300):
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout


@pytest.mark.slow
def test_bench_pipeline_reports_both_figures_and_ratio(small_archive, tmp_path):
    out = tmp_path / "pipeline.json"
    stdout = _run([sys.executable, "bench/bench_pipeline.py", "--archive", str(small_archive), "--device", "cpu",
                   "--epochs", "2", "--batch-size", "64", "--test-images", "100", "--out", str(out)])
    rec = json.loads(out.read_text())
    # the long-tailed set (IF 100, exp profile) of the small archive, and both sides trained on it
    assert rec["class_counts"] == LT_COUNTS and rec["train_images"] == sum(LT_COUNTS) == rec["longtail_images"]
    for side in ("pipeline", "engine"):
        r = rec[side]
        assert len(r["epochs_images_per_s"]) == 2 and all(v > 0 for v in r["epochs_images_per_s"])
        assert r["images_per_s"] == pytest.approx(r["epochs_images_per_s"][1], abs=0.051)  # warm-up dropped (list: 0.1 steps)
        assert all(l == l and l > 0 for l in r["train_loss"])  # finite losses: both really trained
    assert rec["ratio"] == pytest.approx(rec["engine"]["images_per_s"] / rec["pipeline"]["images_per_s"], rel=1e-2)
    assert rec["device"] == "cpu" and rec["cpu_count"] == os.cpu_count() and rec["torch"] and rec["device_name"]
    assert rec["batch_size"] == 64 and rec["pipeline"]["workers"] == min(4, os.cpu_count())
    [target] = rec["targets"]
    assert target["met"] == (rec["ratio"] >= 1.0)
    assert "ratio" in stdout and "target on cpu" in stdout and str(out) in stdout


@pytest.mark.slow
def test_bench_pipeline_subset_and_epochs(small_archive, tmp_path):
    out = tmp_path / "p.json"
    _run([sys.executable, "bench/bench_pipeline.py", "--archive", str(small_archive), "--device", "cpu",
          "--subset", "64", "--epochs", "3", "--batch-size", "32", "--workers", "1", "--only", "engine",
          "--test-images", "50", "--out", str(out)])
    rec = json.loads(out.read_text())
    assert rec["train_images"] == 64 and sum(rec["class_counts"]) == 64 and rec["longtail_images"] == sum(LT_COUNTS)
    assert len(rec["engine"]["epochs_images_per_s"]) == 3 and "pipeline" not in rec and "ratio" not in rec
    p = subprocess.run([sys.executable, "bench/bench_pipeline.py", "--archive", str(small_archive), "--epochs", "1"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "--epochs must be >= 2" in p.stderr


@pytest.mark.slow
def test_gpu_script_runs_reduced_on_cpu(small_archive, tmp_path):
    """bench/gpu.sh end to end on the CPU: the benchmark, then the workflow's two CB-loss jobs."""
    out_dir = tmp_path / "out"
    env = dict(os.environ, DEVICE="cpu", EPOCHS="1", BENCH_EPOCHS="2", CORES="2", OUT_DIR=str(out_dir),
               STUDY="gpu_sh_test")
    env.pop("MLFLOW_TRACKING_URI", None)
    stdout = _run(["bash", "bench/gpu.sh", str(small_archive)], env=env, timeout=600)

    summary = json.loads((out_dir / "gpu_summary.json").read_text())
    a = summary["pipeline"]
    assert a["device"] == "cpu" and a["train_images"] == sum(LT_COUNTS) and a["batch_size"] == 128
    assert a["engine_images_per_s"] > 0 and a["pipeline_images_per_s"] > 0
    assert a["ratio"] == pytest.approx(a["engine_images_per_s"] / a["pipeline_images_per_s"], rel=1e-2)
    assert set(summary["cbloss"]) == {"softmax", "cb_focal"}
    for loss, paper in (("softmax", 29.64), ("cb_focal", 25.43)):
        row = summary["cbloss"][loss]
        assert 0 <= row["top1_error_pct"] <= 100 and row["paper_pct"] == paper
        assert row["epochs"] == 1 and row["device"] == "cpu" and row["num_train"] == sum(LT_COUNTS)
        assert row["wall_s"] > 0 and row["mean_images_per_s"] > 0
        # the numbers come from the workflow's own metrics.json, under the study name given
        m = json.loads(Path(row["metrics"]).read_text())
        assert f"/results/gpu_sh_test/cbloss/cifar10/if100/{loss}/" in row["metrics"]
        assert m["config"]["recipe"]["model"] == "resnet32" and m["config"]["recipe"]["epochs"] == 1
        assert 100 * m["final"]["top1_error"] == pytest.approx(row["top1_error_pct"], abs=0.01)
        assert f"{loss:10s} {row['top1_error_pct']:12.2f} {paper:8.2f}" in stdout

    # everything printed is also in the log, with the machine section and each part's wall time
    log = (out_dir / "gpu.log").read_text()
    for line in ("== machine", "(a) wall:", "(b) wall:", "== summary", "wall: (a) ", "target engine not slower than pipeline"):
        assert line in stdout and line in log
    assert (out_dir / "pipeline.json").exists()
    assert not (ROOT / "results" / "gpu_sh_test").exists()  # the workflow ran in OUT_DIR's work folder
