"""What `snakemake --report` shows: the list of report files, their captions, the provenance tables
and the HTML views of the tables (no Snakemake run here; tests/test_snakemake_report.py builds
a real report and opens it in Chromium)."""

import base64
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT
from docutils.core import publish_parts
from jinja2 import Environment

from finetail.config import load_config
from finetail.record import MetricsRecord
from finetail.report_files import (
    CATEGORIES,
    REPORT_FILES,
    commit_label,
    commits_frame,
    finish_report,
    halves_of,
    provenance_frame,
    report_files,
    write_views,
)

CAPTIONS = ROOT / "workflow" / "report"


def test_entries_are_unique_and_each_subcategory_is_one_half():
    names = [f.name for f in REPORT_FILES]
    assert len(names) == len(set(names))
    made_by_report = report_files(CATEGORIES, rule="report")
    keys = [f.key for f in made_by_report] + [f.key + "_view" for f in made_by_report if f.view]
    assert len(keys) == len(set(keys)), "output keys of the report rule collide"
    shown = [Path(f.shown).name for f in REPORT_FILES]
    assert len(shown) == len(set(shown)), "the report's link targets (file names) collide"
    halves: dict[tuple[str, str], set[str]] = {}
    shows: dict[tuple[str, str], list[str]] = {}
    for f in REPORT_FILES:
        halves.setdefault((f.category, f.subcategory), set()).add(f.half)
        shows.setdefault((f.category, f.subcategory), []).append(f.shows)
        assert (CAPTIONS / f.caption).is_file(), f.caption
        assert "{" not in f.shows and "}" not in f.shows  # Snakemake would read braces as wildcards
    # A later label column that splits a subcategory in two makes Snakemake's report take it
    # for a toggle (and fail): the commit column must be one value per subcategory.
    assert all(len(h) == 1 for h in halves.values()), halves
    assert all(len(s) == len(set(s)) for s in shows.values()), shows


def test_halves_of_a_study():
    assert halves_of({"cbloss": {"x": 1}, "transfer": None}) == ["cbloss", "provenance"]
    # transferability scores are on by default (the schema's default: every score)
    assert halves_of({"transfer": {"x": 1}}) == ["transfer", "transferability", "provenance"]
    assert halves_of({"transfer": {"transferability": {"scores": []}}}) == ["transfer", "provenance"]
    assert halves_of({"transfer": {"selection": {"pool": ["a"], "random": {"seed": 0}}}}) == [
        "transfer", "transferability", "selection_random", "provenance"]
    only_cb = {f.name for f in report_files(["cbloss"])}
    assert "cbloss_table.csv" in only_cb and "provenance.csv" in only_cb and "transfer_table.csv" not in only_cb
    assert "heatmap.png" not in only_cb  # made by the similarity rule
    assert [f.name for f in report_files(["transfer"], rule="similarity")] == ["heatmap.png"]


class _Snakemake:
    """What a caption's Jinja template sees (Snakemake passes input, output, params, config...)."""

    def __init__(self, config):
        self.config = config


def _render(text: str, config: dict, targets: list[str]) -> str:
    """A caption as Snakemake renders it: Jinja, then docutils, with a link target for every
    file of the report (Snakemake appends ``.. _<file name>: javascript:...`` lines)."""
    links = "\n\n" + "\n".join(f".. _{t}: javascript:void(0)" for t in targets) + "\n"
    rst = Environment(trim_blocks=True, lstrip_blocks=True).from_string(text + links).render(
        snakemake=_Snakemake(config), categories={}, files=[])
    return publish_parts(rst, writer="html", settings_overrides={"report_level": 2})["body"]


@pytest.mark.parametrize("halves", [["cbloss"], ["transfer"], ["cbloss", "cbloss_natural", "transfer"],
                                    ["transfer", "transferability", "selection_random"]])
def test_every_caption_renders_without_errors_and_links_only_to_files_of_its_report(halves):
    config = load_config(ROOT / "config.yaml")
    config["cbloss_natural"] = {"datasets": ["natural"], "models": ["resnet8"], "losses": {}, "recipe": {}}
    entries = report_files(halves, rule=None)
    targets = [Path(f.shown).name for f in entries]
    for f in entries:
        body = _render((CAPTIONS / f.caption).read_text(), config, targets)
        assert "system-message" not in body, f"{f.caption}: {body}"
        assert len(re.sub(r"<[^>]+>", "", body).strip()) > 80, f"{f.caption} says too little"


def _metrics(path: Path, rule: str, wildcards: dict, run_id: str, commit: str | None, parent: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = MetricsRecord(rule=rule, wildcards=wildcards, run_id=run_id, git_commit=commit, parent_run_id=parent,
                        config_digest="d" * 64, tracking_uri="sqlite:///x/mlflow.db", final={"top1_error": 0.5})
    path.write_text(json.dumps(rec.to_json()))
    return path


def test_provenance_and_commits_tables(tmp_path):
    res = tmp_path / "results" / "s"
    a = _metrics(res / "cbloss/gen10/if10/softmax/seed0/metrics.json", "cbloss",
                 {"dataset": "gen10", "imbalance": "10", "loss": "softmax"}, "r1", "c" * 40)
    b = _metrics(res / "pretrain/generic/seed0/metrics.json", "pretrain", {"source": "generic"}, "r2", "c" * 40)
    c = _metrics(res / "finetune/generic/cub200/seed0/metrics.json", "finetune", {"source": "generic", "target": "cub200"},
                 "r3", "e" * 40, parent="r2")
    d = _metrics(res / "finetune/scratch/cub200/seed0/metrics.json", "finetune", {"source": "scratch", "target": "cub200"},
                 "r4", None)
    prov = provenance_frame([a, b, c, d], "finetail-s")
    assert prov["run_id"].tolist() == ["r1", "r2", "r3", "r4"]
    assert prov.loc[0, "wildcards"] == "dataset=gen10, imbalance=10, loss=softmax"
    assert prov.loc[2, "parent_run_id"] == "r2" and set(prov["experiment"]) == {"finetail-s"}
    assert prov.loc[1, "metrics_json"] == str(b)
    commits = commits_frame(prov)
    assert commits.to_dict("records") == [
        {"commit": "c" * 40, "runs": 2, "rules": "cbloss, pretrain"},
        {"commit": "e" * 40, "runs": 1, "rules": "finetune"},
        {"commit": "unknown", "runs": 1, "rules": "finetune"},
    ]
    csv = tmp_path / "provenance.csv"
    prov.to_csv(csv, index=False)
    assert commit_label(csv, "cbloss") == "cccccccccccc (1 run)"
    assert commit_label(csv, "transfer") == "cccccccccccc (1 run), eeeeeeeeeeee (1 run), unknown (1 run)"
    assert commit_label(csv, "provenance").startswith("cccccccccccc (2 runs)")
    assert commit_label(csv, "cbloss_natural") == "not recorded"
    assert commit_label(tmp_path / "missing.csv", "cbloss") == "not recorded"


def test_finish_report_by_hand_finds_every_run_and_writes_the_views(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = Path("results/s")
    _metrics(res / "cbloss/gen10/if10/softmax/seed0/metrics.json", "cbloss", {"dataset": "gen10"}, "r1", "c" * 40)
    _metrics(res / "pretrain/generic/seed0/metrics.json", "pretrain", {"source": "generic"}, "r2", "c" * 40)
    out = res / "report"
    out.mkdir(parents=True)
    pd.DataFrame({"loss": ["softmax", "<b>x</b>"], "if10": [1.5, 2.0]}).to_csv(out / "cbloss_table.csv", index=False)
    for name in ("cbloss_cells.csv", "cbloss_shots.csv", "cbloss_paired.csv", "cbloss_methods.csv", "summary.md"):
        (out / name).write_text("a,b\n1,2\n" if name.endswith(".csv") else "# report\n")
    written = finish_report(out, {"cbloss": {"x": 1}}, res, None, "finetail-s")
    assert pd.read_csv(out / "provenance.csv")["run_id"].tolist() == ["r1", "r2"]  # every metrics.json found
    assert {p.name for p in written} >= {"provenance.csv", "commits.csv", "cbloss_table.html", "provenance.html"}
    page = (out / "view" / "cbloss_table.html").read_text()
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page  # cells are escaped
    assert "<td>1.5</td>" in page  # the file's own text
    data = re.search(r'href="data:text/csv;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(data) == (out / "cbloss_table.csv").read_bytes()  # the download is the file itself
    assert "<td>2</td>" in (out / "view" / "cbloss_shots.html").read_text()


def test_a_missing_table_is_named(tmp_path):
    entry = next(f for f in REPORT_FILES if f.name == "transfer_table.csv")
    with pytest.raises(FileNotFoundError, match="transfer_table.csv is missing"):
        write_views(tmp_path, [entry])
