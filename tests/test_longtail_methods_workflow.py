"""The later long-tail methods in the real Snakemake DAG: LDAM-DRW and balanced softmax cells,
post-hoc tau-normalisation and cRT nested under their cell's run, the methods table, and a
post-hoc correction added to a finished study planning no retraining."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from conftest import ROOT
from helpers import planned, snakemake  # the same runner and plan parser as the main DAG tests

pytestmark = pytest.mark.slow

RECIPE = {"model": "resnet8", "width": 4, "epochs": 3, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1,
          "milestones": [2], "lr_factors": [0.1], "eval_every": 3, "crop_pad": 2}
STUDY = {
    "study": "methods",
    "replicates": {"count": 2},
    "world": {"seed": 0, "image_size": 16},
    "datasets": {"gen10": {"kind": "world", "train_per_class": 40, "test_per_class": 10}},
    "cbloss": {
        "datasets": ["gen10"],
        "imbalance": [10],
        "losses": {
            "softmax": {"type": "softmax"},
            "ldam_drw": {"type": "ldam", "max_margin": 0.5, "scale": 30, "drw_epoch": 2, "beta": 0.999},
            "balanced_softmax": {"type": "balanced_softmax"},
        },
        "posthoc": {
            "tau_norm": {"method": "tau_norm", "tau": 1.0, "losses": ["softmax"]},
            "crt": {"method": "crt", "losses": ["softmax"], "recipe": {"epochs": 2, "milestones": [1], "eval_every": 2}},
        },
        "recipe": RECIPE,
    },
    "shots": {"many": 30, "few": 10},
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = tmp_path_factory.mktemp("methods")
    r = snakemake(work, STUDY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work


def test_methods_run_and_post_hoc_jobs_nest_under_their_cells(study):
    from mlflow.tracking import MlflowClient

    res = study / "results" / "methods"
    for seed in (0, 1):
        cell = json.loads((res / f"cbloss/gen10/if10/softmax/seed{seed}/metrics.json").read_text())
        ph = json.loads((res / f"posthoc/gen10/if10/softmax/tau_norm/seed{seed}/metrics.json").read_text())
        assert ph["parent_run_id"] == cell["run_id"] and ph["run_id"] != cell["run_id"]
        assert ph["posthoc"]["method"] == "tau_norm" and ph["posthoc"]["tau"] == 1.0
        assert 0.0 <= ph["final"]["top1_error"] <= 1.0
        crt = json.loads((res / f"posthoc/gen10/if10/softmax/crt/seed{seed}/metrics.json").read_text())
        assert crt["parent_run_id"] == cell["run_id"] and crt["epochs"] == 2
        assert crt["config"]["recipe"]["linear_probe"] and crt["config"]["recipe"]["sampler"] == "class_balanced"
        assert crt["config"]["recipe"]["seed"] == seed and crt["config"]["loss"] == {"type": "softmax"}
        ldam = json.loads((res / f"cbloss/gen10/if10/ldam_drw/seed{seed}/metrics.json").read_text())
        assert ldam["config"]["loss"]["type"] == "ldam" and ldam["config"]["loss"]["drw_epoch"] == 2
    client = MlflowClient(f"sqlite:///{res / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("finetail-methods").experiment_id])
    by_rule = {}
    for run in runs:
        by_rule.setdefault(run.data.tags["finetail.rule"], []).append(run)
    assert {k: len(v) for k, v in by_rule.items()} == {"cbloss": 6, "posthoc": 4}  # tau-norm and cRT
    cell_ids = {r.data.tags["finetail.wildcard.seed"]: r.info.run_id for r in by_rule["cbloss"]
                if r.data.tags["finetail.wildcard.loss"] == "softmax"}
    for run in by_rule["posthoc"]:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == cell_ids[run.data.tags["finetail.wildcard.seed"]]


def test_the_report_sets_the_methods_side_by_side(study):
    rep = study / "results" / "methods" / "report"
    methods = pd.read_csv(rep / "cbloss_methods.csv").set_index("loss")
    assert sorted(methods.index) == ["balanced_softmax", "ldam_drw", "softmax", "softmax+crt", "softmax+tau_norm"]
    assert "cRT" in methods.loc["softmax+crt", "setting"]
    assert (methods["top1_error_n"] == 2).all() and methods["published_error"].isna().all()  # not CIFAR
    assert "τ-norm (τ=1, given)" in methods.loc["softmax+tau_norm", "setting"]
    cells = pd.read_csv(rep / "cbloss_cells.csv")
    ph = cells[cells["loss"] == "softmax+tau_norm"]
    assert len(ph) == 2 and set(ph["tau_source"]) == {"given"}
    assert cells[cells["loss"] == "softmax+crt"]["tau"].isna().all()
    table = pd.read_csv(rep / "cbloss_table.csv").set_index("loss")
    assert "best_cb" not in table.index  # LDAM-DRW's beta is DRW's, not a class-balanced loss of the grid
    assert (rep / "cbloss_few_vs_many.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (rep / "summary.md").read_text()
    assert "Long-tail methods side by side" in summary and "LDAM m=0.5 s=30-DRW" in summary


def test_adding_a_post_hoc_correction_retrains_nothing(study):
    cfg = json.loads(json.dumps(STUDY))
    cfg["cbloss"]["posthoc"]["logit_adjust"] = {"method": "logit_adjust", "tau": 1.0,
                                                "losses": ["softmax", "balanced_softmax"]}
    r = snakemake(study, cfg, "-n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert planned(r) == {"posthoc": 4, "report": 1, "all": 1}  # 2 losses x 2 replicates, and the report


def test_a_crt_with_a_tau_is_refused_naming_the_setting(tmp_path):
    cfg = json.loads(json.dumps(STUDY))
    cfg["cbloss"]["posthoc"]["crt"]["tau"] = 1.0
    r = snakemake(tmp_path, cfg, "-n")
    assert r.returncode != 0 and "cbloss.posthoc.crt: cRT retrains the head and takes no tau" in r.stdout + r.stderr


def test_tau_auto_without_held_out_images_is_refused_naming_the_setting(tmp_path):
    cfg = json.loads(json.dumps(STUDY))
    cfg["cbloss"]["posthoc"]["tau_norm"]["tau"] = "auto"
    r = snakemake(tmp_path, cfg, "-n")
    assert r.returncode != 0
    assert "cbloss.posthoc.tau_norm" in r.stdout + r.stderr and "holdout" in r.stdout + r.stderr


def test_the_cifar_methods_study_plans_with_the_papers_recipe(tmp_path):
    from finetail.report import followups_comparable

    path = ROOT / "workflow" / "studies" / "longtail_methods_cifar.yaml"
    spec = yaml.safe_load(path.read_text())
    assert followups_comparable(spec) == {"cifar10": True, "cifar100": True}  # the registry's CIFAR-10/100
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                        "--configfile", str(path), "-n", "--cores", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    jobs = planned(r)
    assert jobs["cbloss"] == 7 * 2 * 2 * 3 and jobs["posthoc"] == 2 * 2 * 2 * 3 and jobs["crt"] == 2 * 2 * 3
