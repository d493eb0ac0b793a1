"""The results layout has one home (finetail.layout): paths round-trip, nothing else spells a
results folder, and a folder renamed in that module alone still gives a working study,
report, lineage and audit."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from finetail.layout import TRAINING, Layout, parse_train_dir

PKG = ROOT / "src" / "finetail"


@pytest.mark.parametrize("rule", sorted(TRAINING))
def test_a_training_folder_reads_back_as_its_rule_and_wildcards(rule):
    names = re.findall(r"\{(\w+)\}", TRAINING[rule])
    wildcards = {n: {"imbalance": "12.5", "seed": "3"}.get(n, f"v{i}") for i, n in enumerate(names)}
    layout = Layout.of_study("s", base="/tmp/x")
    metrics = layout.train(rule, **wildcards)
    assert metrics.startswith("/tmp/x/results/s/") and metrics.endswith("/metrics.json")
    root, got_rule, got = parse_train_dir(metrics)
    assert (str(root), got_rule, got) == ("/tmp/x/results/s", rule, wildcards)
    cell = ":".join([rule, *wildcards.values()])
    assert layout.cell(cell) == layout.train_dir(rule, **wildcards)
    assert layout.checkpoint(rule, **wildcards).startswith("/tmp/x/results/s/checkpoints/")
    assert layout.train_log(rule, **wildcards).startswith("/tmp/x/logs/s/")


def test_a_malformed_cell_names_what_it_expects():
    layout = Layout.of_study("s")
    with pytest.raises(ValueError, match=r"takes 4 part\(s\) \(dataset, imbalance, loss, seed\), not 3"):
        layout.cell("cbloss:gen10:if10:cb")
    with pytest.raises(ValueError, match="not a training rule"):
        layout.cell("nosuch:a")
    assert layout.cell("cbloss:gen10:if10:cb:seed2") == layout.cell("cbloss:gen10:10:cb:2")
    assert layout.cell("cbloss:gen10:10:cb:2").endswith("/cbloss/gen10/if10/cb/seed2")


def _string_constants(tree: ast.AST):
    """String constants of a module, docstrings excepted."""
    docs = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            docs.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node


def test_no_module_but_layout_spells_a_results_folder():
    layout = Layout.of_study("s")
    folders = {p.split("/")[2] for p in (layout.dataset("d"), layout.longtail("d", 1), layout.source("s"),
                                         layout.features("m", "d"), layout.similarity("m"), layout.selection("x"),
                                         layout.report(), layout.artifacts(), layout.checkpoint("pretrain", source="s", seed=0))}
    folders |= {p.split("/")[0] for p in TRAINING.values()}
    path_like = re.compile(rf"(^|/)({'|'.join(map(re.escape, sorted(folders)))})/")
    found = []
    for f in sorted(PKG.rglob("*.py")):
        if f.name == "layout.py":
            continue
        for node in _string_constants(ast.parse(f.read_text())):
            if path_like.search(node.value) and "://" not in node.value:
                found.append(f"{f.relative_to(PKG)}:{node.lineno}: {node.value!r}")
    rules = [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]
    for f in rules:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"(results|logs)/", line.split("#", 1)[0]):
                found.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "results paths spelled outside finetail.layout:\n" + "\n".join(found)


SMALL = {
    "study": "renamed",
    "world": {"seed": 0, "image_size": 16},
    "datasets": {"gen10": {"kind": "world", "train_per_class": 20, "test_per_class": 5}},
    "cbloss": {
        "datasets": ["gen10"],
        "imbalance": [5],
        "losses": {"softmax": {"type": "softmax"}},
        "recipe": {"model": "resnet8", "width": 4, "epochs": 1, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1,
                   "milestones": [], "lr_factors": [], "eval_every": 1},
    },
}


@pytest.mark.slow
def test_a_folder_renamed_in_the_layout_alone_keeps_study_report_lineage_and_audit_working(tmp_path):
    """In a copy of the tree, the CB-loss grid's folder and the long-tailed sets' folder are
    renamed in finetail/layout.py only; the study runs, its report reads the renamed cells,
    and lineage (by cell and by metrics.json) and audit find everything."""
    code = tmp_path / "code"
    for folder in ("workflow", "envs", "src"):
        shutil.copytree(ROOT / folder, code / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "Snakefile", code / "Snakefile")
    shutil.copy(ROOT / "config.yaml", code / "config.yaml")
    layout_py = code / "src" / "finetail" / "layout.py"
    text = layout_py.read_text()
    renamed = text.replace('"cbloss": "cbloss/{dataset}/if{imbalance}/{loss}/seed{seed}"',
                           '"cbloss": "grid/{dataset}/if{imbalance}/{loss}/run{seed}"')
    renamed = renamed.replace('_LONGTAIL = "longtail"', '_LONGTAIL = "long_tailed"')
    assert renamed.count("grid/") == 1 and "long_tailed" in renamed
    layout_py.write_text(renamed)

    work = tmp_path / "work"
    work.mkdir()
    (work / "study.yaml").write_text(yaml.safe_dump(SMALL, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(code / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(code / "Snakefile"), "--directory", str(work),
                        "--configfile", str(work / "study.yaml"), "--cores", "2"],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = work / "results" / "renamed"
    assert (res / "grid" / "gen10" / "if5" / "softmax" / "run0" / "metrics.json").is_file()
    assert (res / "long_tailed" / "gen10_if5" / "rep0" / "manifest.parquet").is_file()
    assert not (res / "cbloss").exists() and not (res / "longtail").exists()
    assert (res / "checkpoints" / "grid" / "gen10" / "if5" / "softmax" / "run0" / "run.json").is_file()
    cells = (res / "report" / "cbloss_cells.csv").read_text()
    assert "gen10" in cells and "softmax" in cells

    def finetail(*args):
        return subprocess.run([sys.executable, "-m", "finetail.cli", *args], capture_output=True, text=True,
                              cwd=work, env=env, timeout=300)

    run_id = json.loads((res / "grid" / "gen10" / "if5" / "softmax" / "run0" / "metrics.json").read_text())["run_id"]
    for target in ("cbloss:gen10:if5:softmax:0", str(res / "grid" / "gen10" / "if5" / "softmax" / "run0" / "metrics.json")):
        r = finetail("lineage", target, "--results", str(res), "--json")
        assert r.returncode == 0, r.stderr
        chain = json.loads(r.stdout)
        assert chain["run_id"] == run_id and chain["status"] == "FINISHED" and chain["wildcards"]["loss"] == "softmax"
        manifest = next(i for i in chain["inputs"] if i["role"] == "manifest")
        assert "long_tailed" in manifest["path"] and manifest["status"] == "ok"
        assert manifest["sources"][0]["origin"] == "finetail.world"
    r = finetail("audit", "--results", str(res))
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0 changed, 0 missing" in r.stdout
