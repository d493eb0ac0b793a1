"""The real Snakemake DAG on a reduced study: outputs, MLflow runs, and what a change reruns."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from finetail.longtail import class_counts
from finetail.fileio import file_sha256

from conftest import ROOT
from helpers import TINY, planned, snakemake

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = tmp_path_factory.mktemp("study")
    r = snakemake(work, TINY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work


def test_outputs_of_every_stage(study):
    res = study / "results" / "tiny"
    man = pd.read_parquet(res / "datasets" / "gen10" / "rep0" / "manifest.parquet")
    assert len(man) == 10 * 50 and set(man["split"]) == {"train", "test"}
    for imb in (4, 10):
        for seed in (0, 1):  # replicate r's long-tailed subset of replicate r's world
            counts = pd.read_csv(res / "longtail" / f"gen10_if{imb}" / f"rep{seed}" / "counts.csv")
            assert counts["train_count"].tolist() == class_counts(40, 10, imb)
        for loss, seed in [(loss, seed) for loss in ("softmax", "cb_focal") for seed in (0, 1)]:
            m = json.loads((res / "cbloss" / "gen10" / f"if{imb}" / loss / f"seed{seed}" / "metrics.json").read_text())
            assert 0.0 <= m["final"]["top1_error"] <= 1.0 and 0.0 <= m["final"]["ece"] <= 1.0
            assert m["config"]["recipe"]["seed"] == seed and m["wildcards"]["seed"] == str(seed)
            want, got = TINY["cbloss"]["losses"][loss], m["config"]["loss"]
            assert (got["type"], got["beta"]) == (want["type"], want.get("beta", 0.0))
            lt = res / "longtail" / f"gen10_if{imb}" / f"rep{seed}" / "manifest.parquet"
            assert m["inputs"]["manifest_sha256"] == file_sha256(lt)
            per_class = pd.read_csv(res / "cbloss" / "gen10" / f"if{imb}" / loss / f"seed{seed}" / "per_class.csv")
            assert per_class["train_count"].tolist() == class_counts(40, 10, imb)
    table = pd.read_csv(res / "report" / "cbloss_table.csv").set_index("loss")
    assert sorted(table.index) == ["best_cb", "cb_focal", "softmax"]
    assert {"if4_mean", "if4_std", "if4_n", "if10_mean"} <= set(table.columns)
    assert not [c for c in table.columns if c.startswith("paper")]  # a reduced recipe on generated data
    cells = pd.read_csv(res / "report" / "cbloss_cells.csv")
    assert len(cells) == 2 * 2 * 2 and sorted(set(cells["seed"])) == [0, 1]  # one row per run
    for _, row in cells.iterrows():
        folder = res / "cbloss" / "gen10" / f"if{row['imbalance']:g}" / row["loss"] / f"seed{row['seed']}"
        m = json.loads((folder / "metrics.json").read_text())
        assert row["top1_error"] == pytest.approx(100 * m["final"]["top1_error"]) and row["run_id"] == m["run_id"]
    for (imb, loss), g in cells.groupby(["imbalance", "loss"]):
        assert table.loc[loss, f"if{imb:g}_mean"] == pytest.approx(g["top1_error"].mean())
        assert table.loc[loss, f"if{imb:g}_std"] == pytest.approx(g["top1_error"].std(ddof=1))
        assert table.loc[loss, f"if{imb:g}_n"] == 2
    paired = pd.read_csv(res / "report" / "cbloss_paired.csv")
    assert set(paired["loss"]) == {"cb_focal"} and set(paired["n"]) == {2}
    for png in ("cbloss_error_vs_if.png", "cbloss_per_class.png"):
        assert (res / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-1 error" in (res / "report" / "summary.md").read_text()


def test_one_mlflow_run_per_training_job(study):
    from mlflow.tracking import MlflowClient

    res = study / "results" / "tiny"
    client = MlflowClient(f"sqlite:///{res / 'mlflow.db'}")
    exp = client.get_experiment_by_name("finetail-tiny")
    runs = client.search_runs([exp.experiment_id])
    by_rule = {}
    for run in runs:
        by_rule.setdefault(run.data.tags["finetail.rule"], []).append(run)
    # every job x 2 replicates; cbloss_natural's dataset is a world dataset too
    assert {k: len(v) for k, v in by_rule.items()} == {"cbloss": 8, "pretrain": 10, "finetune": 24, "cbloss_natural": 4}
    def key(run):
        return run.data.tags["finetail.wildcard.source"], run.data.tags["finetail.wildcard.seed"]

    pretrain_ids = {key(r): r.info.run_id for r in by_rule["pretrain"]}
    for run in by_rule["finetune"]:  # replicate R's fine-tune: a child of the source's replicate-R pretraining
        assert run.data.tags.get("mlflow.parentRunId") == pretrain_ids.get(key(run))  # None for scratch
    for run in by_rule["cbloss"]:
        tags, params = run.data.tags, run.data.params
        assert run.info.status == "FINISHED"
        assert tags["finetail.rule"] == "cbloss"
        ds, imb, loss, seed = (tags[f"finetail.wildcard.{k}"] for k in ("dataset", "imbalance", "loss", "seed"))
        assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["mlflow.source.git.commit"])
        assert len(tags["finetail.config_digest"]) == 64
        manifest = res / "longtail" / f"{ds}_if{imb}" / f"rep{seed}" / "manifest.parquet"
        assert tags["finetail.input.manifest.sha256"] == file_sha256(manifest)
        assert params["recipe.epochs"] == "3" and params["loss.type"] in ("softmax", "focal")
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert sorted(steps) == [0, 1, 2]
        assert "final_top1_error" in run.data.metrics
        record = json.loads((res / "cbloss" / ds / f"if{imb}" / loss / f"seed{seed}" / "metrics.json").read_text())
        assert record["run_id"] == run.info.run_id
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"per_class.csv", "history.csv"} <= names and any(n.startswith("metrics.json") for n in names)


def test_transfer_outputs(study):
    res = study / "results" / "tiny"
    sim = pd.read_csv(res / "similarity" / "generic+natural" / "rep0" / "matrix.csv", index_col=0)
    assert list(sim.index) == ["generic", "natural", "generic+natural", "selected", "random"]  # config order
    assert list(sim.columns) == ["cub200", "stanford_cars"]
    assert ((sim > 0) & (sim <= 1)).all().all()
    chosen = pd.read_csv(res / "selection" / "selected" / "rep0" / "classes.csv")
    assert 3 <= len(chosen) <= 6 and chosen["score"].is_monotonic_decreasing
    pooled = pd.read_parquet(res / "sources" / "selected" / "rep0" / "manifest.parquet")
    assert set(pooled["class_name"]) == set(chosen["class_name"])
    table = pd.read_csv(res / "report" / "transfer_table.csv")
    assert table["source"].tolist() == ["generic", "natural", "generic+natural", "selected", "random", "scratch"]
    corr = json.loads((res / "report" / "transfer_correlation.json").read_text())
    assert corr["vs_gain"]["n"] == 10
    for k in (0, 1):  # replicate k's features: from replicate k's network (a ranked source's here)
        feats = np.load(res / "features" / "generic+natural" / f"rep{k}" / "cub200.npz")
        pretrain = res / "pretrain" / "generic+natural" / f"seed{k}" / "metrics.json"
        assert str(feats["model_run_id"]) == json.loads(pretrain.read_text())["run_id"]


def test_cbloss_on_naturally_long_tailed_data(study):
    res = study / "results" / "tiny"
    table = pd.read_csv(res / "report" / "cbloss_natural_table.csv").set_index("loss")
    assert sorted(table.index) == ["cb_focal", "softmax"]
    runs = [json.loads((res / "cbloss_natural" / "natural" / "resnet8" / "cb_focal" / f"seed{k}" / "metrics.json")
                       .read_text()) for k in (0, 1)]
    for k, m in enumerate(runs):
        natural = pd.read_parquet(res / "datasets" / "natural" / f"rep{k}" / "manifest.parquet")
        assert m["num_train"] == int((natural["split"] == "train").sum())  # the whole split, as it is
    assert table.loc["cb_focal", "natural_top1_mean"] == pytest.approx(np.mean([100 * m["final"]["top1_error"] for m in runs]))
    assert table.loc["cb_focal", "natural_top5_mean"] == pytest.approx(np.mean([100 * m["final"]["top5_error"] for m in runs]))
    assert table.loc["cb_focal", "natural_top1_n"] == 2


def test_nothing_to_do_after_a_full_run(study):
    r = snakemake(study, TINY, "-n")
    assert r.returncode == 0
    assert planned(r) == {}


def test_changing_one_beta_reruns_only_its_cells_and_the_report(study):
    cfg = json.loads(json.dumps(TINY))
    cfg["cbloss"]["losses"]["cb_focal"]["beta"] = 0.9
    r = snakemake(study, cfg, "-n")
    assert r.returncode == 0, r.stderr
    assert planned(r) == {"cbloss": 4, "report": 1, "all": 1}  # 2 imbalance factors x 2 replicates


def test_changing_one_targets_finetune_setting_reruns_only_its_finetunes(study):
    cfg = json.loads(json.dumps(TINY))
    cfg["transfer"]["finetune"]["per_target"] = {"cub200": {"lr": 0.01}}
    r = snakemake(study, cfg, "-n")
    assert r.returncode == 0, r.stderr
    assert planned(r) == {"finetune": 12, "report": 1, "all": 1}  # 5 sources + scratch, for cub200 only, x 2 replicates
    assert set(re.findall(r"output: \S*finetune/[^/\s]+/([^/\s]+)/seed\d+/metrics\.json", r.stdout)) == {"cub200"}


def test_a_third_replicate_expands_every_stage_and_pairs_finetunes_with_their_pretrain(study):
    cfg = json.loads(json.dumps(TINY))
    cfg["replicates"]["count"] = 3
    r = snakemake(study, cfg, "-n", "-p")
    assert r.returncode == 0, r.stderr
    jobs = planned(r)
    # only replicate 2 is new: its world (6 datasets), long-tailed subsets (2 IFs), cells
    # (2 IFs x 2 losses), the 5 sources' pooling and pretraining, features (5 sources + 2
    # targets), similarity, selection, random draw, (5 sources + scratch) x 2 targets fine-tunes
    # and 5 x 2 scoring jobs
    assert (jobs["generate_world"], jobs["longtail"], jobs["cbloss"], jobs["pool_source"], jobs["pretrain"]) == (5, 2, 4, 5, 5)
    assert (jobs["features"], jobs["similarity"], jobs["selection"], jobs["random_subset"]) == (7, 1, 1, 1)
    assert (jobs["finetune"], jobs["transferability"]) == (12, 10)
    assert len(set(re.findall(r"cbloss/gen10/if\d+/\w+/seed2/metrics\.json", r.stdout))) == 4
    assert not re.findall(r"(?:seed|rep)[01]/\S*(?:metrics\.json|manifest\.parquet)\n", r.stdout.split("Job stats")[0])
    # replicate 2 generates world seed 0 + 2
    assert '"seed":2' in re.search(r"finetail generate --dataset gen10 .*", r.stdout).group(0)
    # fine-tune replicate R starts from the source's network of replicate R
    inits = re.findall(r"--init-model '?\S*pretrain/([^/\s]+)/seed(\d)/model\.pt'?.*?--out-dir '?\S*finetune/([^/\s]+)/[^/\s]+/seed(\d)", r.stdout)
    assert len(inits) == 10 and all(a == c and b == d == "2" for a, b, c, d in inits)


def test_editing_code_plans_the_jobs_that_run_it(study, tmp_path):
    """A copy of the workflow and library: unchanged, nothing to do. Each edit below (the
    training job's module, the tracking module, the train command's lines in cli.py, the
    pooling module) plans again exactly the jobs whose command reaches that code (found from
    the imports, finetail.code), and what reads their results; the edit is undone before the
    next one."""
    import shutil

    code = tmp_path / "code"
    shutil.copytree(ROOT / "workflow", code / "workflow")
    shutil.copytree(ROOT / "src", code / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "Snakefile", code / "Snakefile")
    shutil.copy(ROOT / "config.yaml", code / "config.yaml")
    pkg = code / "src" / "finetail"

    def plan():
        cfg = study / "study.yaml"
        cfg.write_text(yaml.safe_dump(TINY, sort_keys=False))
        r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(code / "Snakefile"), "--directory", str(study),
                            "--configfile", str(cfg), "--cores", "1", "-n"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return planned(r)

    assert plan() == {}
    training = {"cbloss": 8, "cbloss_natural": 4, "pretrain": 10, "finetune": 24}  # every job x 2 replicates
    edits = [
        ("training/job.py", lambda t: t + "\n# an edit\n", training),
        ("tracking.py", lambda t: t + "\n# an edit\n", training),
        ("cli.py", lambda t: t.replace("    launch(a)\n", "    launch(a)  # an edit\n", 1), training),
        ("transfer.py", lambda t: t + "\n# an edit\n", {"pool_source": 10, "pretrain": 10, "finetune": 20,
                                                          "transferability": 20}),
        # the scores: only the scoring jobs (and the report) read them
        ("transferability.py", lambda t: t + "\n# an edit\n", {"transferability": 20, "pretrain": None}),
    ]
    for name, edit, expected in edits:
        f = pkg / name
        before = f.read_text()
        f.write_text(edit(before))
        assert f.read_text() != before
        jobs = plan()
        assert {k: jobs.get(k) for k in expected} == expected, name
        assert "generate_world" not in jobs and "longtail" not in jobs, name
        f.write_text(before)
    assert plan() == {}
    # an edit elsewhere in cli.py (another command's lines) plans nothing
    cli = pkg / "cli.py"
    cli.write_text(cli.read_text().replace('    print(format_audit(', '    print(  # an edit\n        format_audit(', 1))
    assert plan() == {}


def test_lint_is_clean():
    r = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Lints for" not in r.stdout + r.stderr


def test_transferability_scores_and_the_random_source(study):
    """Every (source, target) pair's scores from that source's own network; the random source
    matches the greedy one in classes and images; the report ranks the scores and compares
    selected, random and the whole pool."""
    res = study / "results" / "tiny"
    chosen = pd.read_csv(res / "selection" / "selected" / "rep0" / "classes.csv")
    drawn = pd.read_csv(res / "selection" / "random" / "rep0" / "classes.csv")
    assert len(drawn) == len(chosen) and set(drawn["class_name"]) != set(chosen["class_name"])
    assert int(drawn["images"].sum()) == min(int(chosen["count"].sum()), int(drawn["count"].sum()))
    pooled = pd.read_parquet(res / "sources" / "random" / "rep0" / "manifest.parquet")
    kept = pooled[pooled["split"] == "train"].groupby("class_name").size()
    assert kept.to_dict() == drawn.set_index("class_name")["images"].to_dict()
    sources = ["generic", "natural", "generic+natural", "selected", "random"]
    for s, k in [(s, k) for s in sources for k in (0, 1)]:
        run_id = json.loads((res / "pretrain" / s / f"seed{k}" / "metrics.json").read_text())["run_id"]
        for t in ("cub200", "stanford_cars"):
            sc = pd.read_csv(res / "transferability" / s / t / f"rep{k}" / "scores.csv")
            assert sc["seed"].tolist() == [k] and sc["model_run_id"].tolist() == [run_id]
            assert sc["manifest_sha256"].iloc[0] == file_sha256(res / "datasets" / t / f"rep{k}" / "manifest.parquet")
            target = pd.read_parquet(res / "datasets" / t / f"rep{k}" / "manifest.parquet")
            assert sc["n_images"].iloc[0] == int((target["split"] == "train").sum())
            classes = pd.read_csv(res / "sources" / s / f"rep{k}" / "classes.csv")
            assert sc["source_classes"].iloc[0] == len(classes)  # LEEP/NCE read the source network's own head
            r = sc.iloc[0]
            assert np.isfinite(r[["logme", "leep", "nce", "hscore", "regularized_hscore", "knn"]].astype(float)).all()
            assert r["nce"] <= 0 and r["leep"] <= 0 and 0 <= r["knn"] <= 1
    table = pd.read_csv(res / "report" / "transferability.csv")
    assert table["score"].tolist() == ["emd", "logme", "leep", "nce", "hscore", "regularized_hscore", "knn"]
    assert {"cub200_tau", "stanford_cars_tau", "mean_tau", "mean_weighted_tau", "seconds_per_pair"} <= set(table.columns)
    pairs = pd.read_csv(res / "report" / "transferability_pairs.csv")
    assert len(pairs) == 7 * len(sources) * 2 * 2  # scores x sources x targets x replicates
    acc = pd.read_csv(res / "report" / "transfer_cells.csv").set_index(["source", "target", "seed"])["top1_acc"]
    for _, p in pairs.iterrows():
        assert p["top1_acc"] == pytest.approx(acc.loc[(p["source"], p["target"], p["seed"])])
    ab = pd.read_csv(res / "report" / "selection_vs_random.csv").set_index("target")
    assert list(ab.index) == ["cub200", "stanford_cars", "mean"]
    assert {"selected_mean", "random_mean", "pool_mean", "selected_minus_random"} <= set(ab.columns)
    assert ab.loc["cub200", "selected_mean"] == pytest.approx(np.mean([acc.loc[("selected", "cub200", k)] for k in (0, 1)]))
    claims = pd.read_csv(res / "report" / "claims.csv").set_index("claim")
    mean = claims.loc["transfer:selected-vs-random:mean"]
    assert mean["replicates"] == 2 and mean["estimate"] == pytest.approx(ab.loc["mean", "selected_minus_random"], abs=1e-6)
    assert mean["sources"] == "world + random draw + training seed"
    summary = (res / "report" / "summary.md").read_text()
    assert "Which score predicts transfer" in summary and "Is greedy selection worth it?" in summary
    assert (res / "report" / "transferability_vs_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_changing_knn_k_reruns_only_the_scores_and_the_report(study):
    cfg = json.loads(json.dumps(TINY))
    cfg["transfer"]["transferability"] = {"knn_k": 3}
    r = snakemake(study, cfg, "-n")
    assert r.returncode == 0, r.stderr
    assert planned(r) == {"transferability": 20, "report": 1, "all": 1}


def test_the_report_rebuilt_from_the_same_results_is_byte_identical(study, tmp_path):
    """One machine, one commit: the report's tables (claims.csv among them) come out
    byte-identical when built again from the same results, by Snakemake's own command."""
    res = study / "results" / "tiny" / "report"
    r = snakemake(study, TINY, "-n", "-p", "--forcerun", "report")
    assert r.returncode == 0, r.stderr[-2000:]
    cmd = re.search(r"^(?:Shell command: )?(finetail report .*?) > \S+ 2>&1$", r.stdout, flags=re.M).group(1)
    cmd = cmd.replace("--out-dir results/tiny/report", f"--out-dir {tmp_path / 'again'}")
    again = subprocess.run(cmd, shell=True, cwd=study, capture_output=True, text=True,
                           env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    assert again.returncode == 0, again.stderr[-2000:]
    tables = sorted(p.name for p in res.glob("*.csv"))
    assert "claims.csv" in tables and len(tables) >= 10
    timed = {"transferability.csv", "transferability_pairs.csv"}  # they carry each score's measured seconds
    for name in tables:
        if name in timed:
            a, b = (pd.read_csv(d / name) for d in (tmp_path / "again", res))
            clock = [c for c in a.columns if "seconds" in c or c.endswith("_s")]
            assert clock and a.drop(columns=clock).equals(b.drop(columns=clock)), name
        else:
            assert (tmp_path / "again" / name).read_bytes() == (res / name).read_bytes(), name
