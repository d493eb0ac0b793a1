"""The report people open: `snakemake --report report.html` on a real reduced study (both halves),
opened in headless Chromium; and the study's MLflow store, copied elsewhere, in the MLflow UI.

Chromium is Debian's ``chromium`` package (.ci/run installs it); without it the browser tests
are skipped and say so (the checks of the report file and of the UI's REST API still run), and
under CI they fail (``conftest.require``).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from chromium import Chromium, find_chromium, png_is_blank, png_size
from conftest import ROOT, require

from finetail.report_files import CATEGORIES, commit_label, halves_of, report_files

pytestmark = pytest.mark.slow

_RECIPE = {"model": "resnet8", "width": 4, "epochs": 2, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1,
           "milestones": [1], "lr_factors": [0.1], "eval_every": 1, "crop_pad": 2}
# Both halves at their smallest: 2 CB-loss cells, 2 sources pretrained, 3 fine-tunes (7 runs).
STUDY = {
    "study": "rep",
    "world": {"seed": 0, "image_size": 16},
    "datasets": {
        "gen10": {"kind": "world", "train_per_class": 40, "test_per_class": 10},
        **{d: {"kind": "world", "train_per_class": 12, "test_per_class": 6} for d in ("generic", "natural", "cub200")},
    },
    "cbloss": {
        "datasets": ["gen10"],
        "imbalance": [10],
        "losses": {"softmax": {"type": "softmax"}, "cb_focal": {"type": "focal", "beta": 0.99, "gamma": 0.5}},
        "recipe": _RECIPE,
    },
    "shots": {"many": 30, "few": 10},
    "transfer": {
        "sources": {"generic": ["generic"], "natural": ["natural"]},
        "targets": ["cub200"],
        "features": {"model": "generic"},
        "similarity": {"min_source_images": 2},
        "pretrain": {"recipe": _RECIPE | {"epochs": 1}},
        "finetune": {"recipe": _RECIPE | {"epochs": 1}},
    },
}
CHROMIUM = find_chromium()
NO_CHROMIUM = "no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)"


def snakemake(workdir: Path, config: dict, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cfg = workdir / "study.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(cfg), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = tmp_path_factory.mktemp("report_study")
    t0 = time.monotonic()
    r = snakemake(work, STUDY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    t1 = time.monotonic()
    r = snakemake(work, STUDY, "--report", str(work / "report.html"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"study {t1 - t0:.0f} s, snakemake --report {time.monotonic() - t1:.0f} s")
    return work


def _embedded(page: str, name: str):
    """A variable the report embeds as JSON (``var results = {...};``)."""
    m = re.search(rf'<script id="[\w-]+">\s*var {name} = (.*?);\s*</script>', page, flags=re.DOTALL)
    assert m, f"no {name} in the report"
    return json.loads(m.group(1))


def _expected():
    """(category, subcategory, file name shown, entry) of every result the study's report holds."""
    return [(f.category, f.subcategory, Path(f.shown).name, f) for f in report_files(halves_of(STUDY), rule=None)]


def test_the_report_holds_every_table_and_figure_with_its_caption_and_commit(study):
    page = (study / "report.html").read_text()
    results, categories = _embedded(page, "results"), _embedded(page, "categories")
    assert set(categories) == set(CATEGORIES.values())
    by_name = {Path(p).name: r for p, r in results.items()}
    expected = _expected()
    assert set(by_name) == {name for _, _, name, _ in expected}
    provenance = study / "results" / "rep" / "report" / "provenance.csv"
    for category, subcategory, name, entry in expected:
        assert name in {Path(p).name for p in categories[category][subcategory]}, (category, subcategory, name)
        r = by_name[name]
        assert len(r["caption"]) > 200 and "system-message" not in r["caption"], (name, r["caption"])
        assert r["labels"] == {"result": entry.shows, "commit": commit_label(provenance, entry.half)}
    # every training run of the study is in the provenance table, linked to its MLflow run and commit
    prov = pd.read_csv(provenance)
    assert sorted(prov["rule"]) == ["cbloss"] * 2 + ["finetune"] * 3 + ["pretrain"] * 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{study / 'results' / 'rep' / 'mlflow.db'}")
    for row in prov.itertuples():
        run = client.get_run(row.run_id)
        assert run.data.tags["mlflow.source.git.commit"] == row.git_commit
        assert run.data.tags["finetail.rule"] == row.rule
        assert client.get_experiment(run.info.experiment_id).name == row.experiment == "finetail-rep"
    # the front page names the commits the runs ran
    desc = _embedded(page, "workflow_desc")
    assert "system-message" not in desc
    for commit in prov["git_commit"].unique():
        assert commit in desc


def test_the_report_renders_in_headless_chromium(study, tmp_path):
    """Open report.html as a person would: each category, each subcategory, each result's view
    button; figures must load as images of their PNG's size, tables as HTML tables."""
    require(CHROMIUM, NO_CHROMIUM)
    t0 = time.monotonic()
    pngs = {p.name: p for p in (study / "results" / "rep").rglob("*.png")}
    with Chromium(CHROMIUM) as browser:
        page = browser.open((study / "report.html").as_uri())
        page.wait_for("typeof app !== 'undefined' && document.querySelector('#app').innerText.includes('finetail: study')",
                      timeout=60)
        page.evaluate(_CLICKERS)
        home = page.screenshot()
        (tmp_path / "home.png").write_bytes(home)
        assert not png_is_blank(home)
        text = page.evaluate("document.querySelector('#app').innerText")
        for category in set(CATEGORIES.values()):
            assert category in text
        seen = 0
        for category in sorted(set(CATEGORIES.values())):
            subcategories = sorted({s for c, s, _, _ in _expected() if c == category})
            for sub in subcategories:
                page.evaluate("ftClick('Results')")  # the breadcrumb back to the categories
                page.wait_for(f"ftClick({json.dumps(category)})")
                if len(subcategories) > 1:  # a category with one subcategory opens it at once
                    page.wait_for(f"ftClick({json.dumps(sub)})")
                for c, s, name, entry in _expected():
                    if (c, s) != (category, sub):
                        continue
                    page.wait_for(f"ftView({json.dumps(entry.shows)})")
                    if entry.is_figure:
                        size = page.wait_for(f"ftImage({json.dumps(name)})")
                        assert tuple(size) == png_size(pngs[name].read_bytes()), name
                    else:
                        page.wait_for(f"ftFrame({json.dumps(name)})")
                        assert _wait_frame_table(page, name) >= 1, name
                    shot = page.screenshot()
                    (tmp_path / f"{name}.png").write_bytes(shot)
                    assert not png_is_blank(shot)
                    seen += 1
        assert seen == len(_expected())
        assert page.console_errors() == []
    print(f"browsed {seen} results in {time.monotonic() - t0:.1f} s")


def _wait_frame_table(page, name: str, timeout: float = 20.0) -> int:
    """Rows of the table (or lines of the text) in the view iframe of ``name``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for frame in page.child_frames():
            if f"filename={name};" in frame.get("url", ""):
                n = page.evaluate_in_frame(frame["id"], "document.querySelectorAll('table tr, pre').length")
                if n:
                    return n
        time.sleep(0.2)
    raise AssertionError(f"the view of {name} shows no table")


# Click like a person: a link or button by its text, the eye button of a result row; read
# what the content pane shows.
_CLICKERS = r"""
window.ftClick = function (text) {
  const hit = Array.from(document.querySelectorAll('#app a, #app button'))
    .find(e => e.innerText && e.innerText.trim() === text && e.offsetParent !== null);
  if (!hit) return false;
  hit.click();
  return true;
};
window.ftView = function (shows) {
  const row = Array.from(document.querySelectorAll('#app tr'))
    .find(r => Array.from(r.querySelectorAll('td')).some(td => td.innerText.trim() === shows));
  if (!row) return false;
  row.querySelector('a').click();
  return true;
};
window.ftImage = function (name) {   // the figure on show, once loaded: its size
  const img = document.querySelector('img[src^="data:image/png"]');
  return img && img.src.includes('filename=' + name + ';') && img.complete && img.naturalWidth > 0
    ? [img.naturalWidth, img.naturalHeight] : false;
};
window.ftFrame = function (name) {   // the HTML view on show
  const f = document.querySelector('iframe[src^="data:text/html"]');
  return Boolean(f && f.src.includes('filename=' + name + ';'));
};
"""


def test_a_study_without_transfer_or_without_cbloss_plans_its_report(tmp_path):
    for drop, study in (("transfer", "cbonly"), ("cbloss", "tronly")):
        cfg = {k: v for k, v in STUDY.items() if k != drop} | {"study": study}
        r = snakemake(tmp_path, cfg, "--dry-run")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        out = r.stdout + r.stderr
        line = re.search(r"rule report:.*?\n\s*output: (.*?)\n", out, flags=re.DOTALL).group(1)
        planned = {Path(p.strip()).name for p in line.split(",")}
        want = {Path(n).name for f in report_files(halves_of(cfg)) for n in (f.name, f.view) if n}
        assert planned == want
        assert ("transfer_table.csv" in planned) == (drop != "transfer")
        assert ("cbloss_table.csv" in planned) == (drop != "cbloss")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_copied_study_keeps_its_artifacts_in_the_mlflow_ui(study, tmp_path):
    """Copy results/rep elsewhere (the original stays), run `finetail ui` on the copy: the
    store points at the copy's artifacts, every run's artifacts list through the UI's REST API,
    and (with Chromium) the printed URL lands on the runs table."""
    copy = tmp_path / "elsewhere" / "results" / "rep"
    shutil.copytree(study / "results" / "rep", copy)
    prov = pd.read_csv(copy / "report" / "provenance.csv")
    port = _free_port()
    finetail = [sys.executable, "-m", "finetail.cli"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(tmp_path / "ui.log", "w") as ui_log:
        proc = subprocess.Popen([*finetail, "ui", "--results", str(copy), "--port", str(port)], env=env,
                                stdout=subprocess.PIPE, stderr=ui_log, text=True)
    try:
        url = proc.stdout.readline().strip().split(": ", 1)[1]
        assert url.endswith("/runs?workflowType=machine_learning") and f":{port}/" in url
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                with urllib.request.urlopen(base + "/health", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
                time.sleep(0.5)
        else:
            pytest.fail("the MLflow UI did not answer /health in 2 minutes:\n" + (tmp_path / "ui.log").read_text()[-3000:])
        log = (tmp_path / "ui.log").read_text()
        assert "artifact location file://" in log and f"-> {(copy / 'mlartifacts').as_uri()}, 7 run(s) moved" in log
        for run_id in prov["run_id"]:
            with urllib.request.urlopen(f"{base}/api/2.0/mlflow/artifacts/list?run_id={run_id}", timeout=30) as r:
                listing = json.load(r)
            assert listing["root_uri"].startswith((copy / "mlartifacts").as_uri())
            assert {"per_class.csv", "history.csv"} <= {f["path"] for f in listing["files"]}
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=finetail-rep") as r:
            tags = {t["key"]: t["value"] for t in json.load(r)["experiment"]["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        if CHROMIUM:
            with Chromium(CHROMIUM) as browser:
                page = browser.open(url.replace(":5000/", f":{port}/"))
                # the runs table: its header, its count and a run's name (rows load after the count)
                text = page.wait_for("location.href.includes('/runs?') && ['Run Name', '7 matching runs', "
                                     "'pretrain:generic'].every(t => document.body.innerText.includes(t)) "
                                     "&& document.body.innerText", timeout=120)
                assert "Usage" not in text  # not MLflow's GenAI overview (usage, quality, tool calls)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # the original study still points at its own folder
    from mlflow.tracking import MlflowClient

    original = MlflowClient(f"sqlite:///{study / 'results' / 'rep' / 'mlflow.db'}")
    exp = original.get_experiment_by_name("finetail-rep")
    assert exp.artifact_location == (study / "results" / "rep" / "mlartifacts").resolve().as_uri()
    require(CHROMIUM, NO_CHROMIUM + ": the printed URL was not opened in a browser")
