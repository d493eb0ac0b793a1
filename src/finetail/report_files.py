"""What ``snakemake --report`` shows: every table and figure of a study, with its caption and provenance.

One table, :data:`REPORT_FILES`, lists the files of a study's report: the file, the half of
the study it belongs to (its category in the Snakemake report), its subcategory, a line
saying what it shows and its caption (an rst file in ``workflow/report/``, rendered by
Snakemake with the study's config). ``workflow/rules/report.smk`` declares exactly these
outputs for the halves a study has, each flagged with ``report()``; adding a file to the
report is one line here and one caption file.

Snakemake's HTML report shows figures and HTML pages, and offers every other file as a
download. So the report rule also writes an HTML view of each table (:func:`write_views`:
the table itself, with the file as a download link); that view is what the report embeds.

Provenance: :func:`provenance_frame` lists every training run behind the report (rule,
wildcards, MLflow run id and experiment, git commit, config digest, its ``metrics.json``),
and :func:`commits_frame` counts those runs per commit for the report's front page. Both read
``metrics.json`` files only, as the report does.

Imports neither snakemake nor mlflow; pandas only where a table is read or written (the
Snakefile imports this module while it parses the DAG).
"""

from __future__ import annotations

import base64
import glob
import html
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .fileio import atomic_write
from .layout import TRAINING, Layout
from .record import MetricsRecord

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CATEGORIES",
    "HALF_RULES",
    "PROVENANCE_COLUMNS",
    "REPORT_FILES",
    "ReportFile",
    "commit_label",
    "commits_frame",
    "finish_report",
    "halves_of",
    "provenance_frame",
    "report_entry",
    "report_files",
    "write_views",
]

# The halves of a study (config keys; "provenance" is always there) and their category.
CATEGORIES: dict[str, str] = {
    "cbloss": "Long-tail (class-balanced loss)",
    "cbloss_natural": "Long-tail (class-balanced loss)",
    "transfer": "Transfer (domain similarity)",
    # parts of the transfer half a study may leave out (transfer.transferability.scores, selection.random)
    "transferability": "Transfer (domain similarity)",
    "selection_random": "Transfer (domain similarity)",
    "provenance": "Provenance",
}
# The training rules whose runs make each half's numbers (None: all of them).
HALF_RULES: dict[str, tuple[str, ...] | None] = {
    "cbloss": ("cbloss",),
    "cbloss_natural": ("cbloss_natural",),
    "transfer": ("pretrain", "finetune"),
    "transferability": ("pretrain", "finetune"),
    "selection_random": ("pretrain", "finetune"),
    "provenance": None,
}
_FIGURE = (".png", ".svg", ".jpg", ".jpeg", ".pdf")


@dataclass(frozen=True)
class ReportFile:
    """One table or figure of the report.

    name : the file's name (under ``report/`` when ``rule`` is "report").
    half : a key of :data:`CATEGORIES`: the report holds it when the study has that half.
    subcategory : its group within the half ("Tables", "Figures"); the entries of one
        subcategory belong to one half (their commit column must agree, see report.smk).
    shows : one line: what it shows (the first column of the Snakemake report's result list,
        unique within a subcategory).
    caption : its rst caption in ``workflow/report/``: what it shows and how it was made.
    rule : the rule that writes it (the report rule, or e.g. "similarity" for the heatmap).
    """

    name: str
    half: str
    subcategory: str
    shows: str
    caption: str
    rule: str = "report"

    @property
    def category(self) -> str:
        return CATEGORIES[self.half]

    @property
    def is_figure(self) -> bool:
        return self.name.lower().endswith(_FIGURE)

    @property
    def key(self) -> str:
        """The file's name as a Snakemake output key: ``cbloss_table.csv`` -> ``cbloss_table_csv``."""
        return re.sub(r"\W+", "_", self.name)

    @property
    def view(self) -> str | None:
        """The HTML view the report embeds for a table (``view/<stem>.html``); None for a figure."""
        return None if self.is_figure else f"view/{Path(self.name).stem}.html"

    @property
    def shown(self) -> str:
        """The file the Snakemake report embeds: the figure, or the table's view."""
        return self.view or self.name


REPORT_FILES: tuple[ReportFile, ...] = (
    # -- long tail: class-balanced loss on long-tailed versions of balanced sets
    ReportFile("cbloss_table.csv", "cbloss", "Tables", "top-1 error (%) by loss and imbalance factor: mean ± std over seeds",
               "cbloss_table.rst"),
    ReportFile("cbloss_cells.csv", "cbloss", "Tables", "one row per training run: setting, metrics, MLflow run id",
               "cbloss_cells.rst"),
    ReportFile("cbloss_shots.csv", "cbloss", "Tables", "many / medium / few-shot accuracy and ECE (%), mean ± std",
               "cbloss_shots.rst"),
    ReportFile("cbloss_paired.csv", "cbloss", "Tables", "each loss minus softmax, paired over seeds, with 95% CI",
               "cbloss_paired.rst"),
    ReportFile("cbloss_methods.csv", "cbloss", "Tables",
               "long-tail methods side by side: top-1 error, balanced and many/medium/few-shot accuracy (%)",
               "cbloss_methods.rst"),
    ReportFile("cbloss_error_vs_if.png", "cbloss", "Figures", "top-1 error vs imbalance factor, one line per loss",
               "cbloss_error_vs_if.rst"),
    ReportFile("cbloss_per_class.png", "cbloss", "Figures", "per-class accuracy vs training images, highest imbalance",
               "cbloss_per_class.rst"),
    ReportFile("cbloss_few_vs_many.png", "cbloss", "Figures", "few-shot vs many-shot accuracy, one point per method",
               "cbloss_few_vs_many.rst"),
    # -- long tail: naturally long-tailed data
    ReportFile("cbloss_natural_table.csv", "cbloss_natural", "Naturally long-tailed data",
               "naturally long-tailed data: top-1 / top-5 error (%) by model and loss", "cbloss_natural_table.rst"),
    # -- transfer: domain similarity and fine-tuning
    ReportFile("transfer_table.csv", "transfer", "Tables", "fine-tune top-1 accuracy (%): sources x targets",
               "transfer_table.rst"),
    ReportFile("transfer_cells.csv", "transfer", "Tables", "one row per fine-tune: accuracy, MLflow run and parent run",
               "transfer_cells.rst"),
    ReportFile("similarity_vs_accuracy.csv", "transfer", "Tables", "each (source, target) pair: similarity and accuracy",
               "similarity_vs_accuracy_csv.rst"),
    ReportFile("transfer_correlation.json", "transfer", "Tables", "rank correlation of similarity with accuracy",
               "transfer_correlation.rst"),
    ReportFile("similarity_vs_accuracy.png", "transfer", "Figures", "domain similarity vs fine-tune accuracy",
               "similarity_vs_accuracy.rst"),
    ReportFile("heatmap.png", "transfer", "Figures", "domain similarity of each source to each target",
               "similarity.rst", rule="similarity"),
    ReportFile("transferability.csv", "transferability", "Transferability scores",
               "which score predicts transfer: Kendall τ and weighted τ of each score vs fine-tune accuracy",
               "transferability.rst"),
    ReportFile("transferability_pairs.csv", "transferability", "Transferability scores",
               "each score of each (source network, target) pair beside its fine-tune accuracy",
               "transferability_pairs.rst"),
    ReportFile("transferability_vs_accuracy.png", "transferability", "Transferability scores",
               "each transferability score vs fine-tune accuracy, per target", "transferability_vs_accuracy.rst"),
    ReportFile("selection_vs_random.csv", "selection_random", "Greedy selection vs random classes",
               "greedy selected source vs random classes (same size): fine-tune accuracy, paired difference",
               "selection_vs_random.rst"),
    # -- provenance: which run and commit made each number
    ReportFile("provenance.csv", "provenance", "Runs", "every training run: MLflow run id, experiment, git commit",
               "provenance.rst"),
    ReportFile("commits.csv", "provenance", "Runs", "the git commits the training runs ran, with run counts",
               "commits.rst"),
    ReportFile("summary.md", "provenance", "Summary", "the whole report as Markdown (summary.md)", "summary.rst"),
)


def halves_of(config: Mapping) -> list[str]:
    """The halves a study (config or report spec) has, in :data:`CATEGORIES` order, provenance last."""
    tr = config.get("transfer") or {}
    # transferability scores are on unless a study lists none (the schema's default: all of them) and no plugin
    ts = (tr or {}).get("transferability") or {}
    parts = {"transferability": bool(tr) and (bool(ts.get("scores", True)) or bool(ts.get("plugins"))),
             "selection_random": bool((tr.get("selection") or {}).get("random"))}
    return [h for h in CATEGORIES if h == "provenance" or (parts[h] if h in parts else config.get(h))]


def report_entry(name: str) -> ReportFile:
    """The entry of :data:`REPORT_FILES` for file ``name``; KeyError naming the known files."""
    for f in REPORT_FILES:
        if f.name == name:
            return f
    raise KeyError(f"{name!r} is not in finetail.report_files.REPORT_FILES ({', '.join(f.name for f in REPORT_FILES)})")


def report_files(halves: Iterable[str], rule: str | None = "report") -> list[ReportFile]:
    """The entries of :data:`REPORT_FILES` for these halves (provenance always), made by
    ``rule`` (None: by any rule)."""
    hs = set(halves) | {"provenance"}
    return [f for f in REPORT_FILES if f.half in hs and (rule is None or f.rule == rule)]


# --------------------------------------------------------------------------- provenance
PROVENANCE_COLUMNS = ["rule", "wildcards", "run_id", "parent_run_id", "experiment", "git_commit",
                      "config_digest", "tracking_uri", "metrics_json"]


def provenance_frame(metrics: Iterable[str | os.PathLike], experiment: str | None) -> pd.DataFrame:
    """One row per training run: the run behind each ``metrics.json`` (in the order given).

    Columns: :data:`PROVENANCE_COLUMNS`; ``wildcards`` as ``name=value`` pairs joined by
    ``, ``; ``metrics_json`` as given (the rules give paths relative to the study's working
    folder); ``experiment`` is the MLflow experiment the runs were logged to.
    """
    import pandas as pd

    rows = []
    for path in metrics:
        m = MetricsRecord.read(path)
        rows.append({
            "rule": m.rule,
            "wildcards": ", ".join(f"{k}={v}" for k, v in (m.wildcards or {}).items()),
            "run_id": m.run_id,
            "parent_run_id": m.parent_run_id,
            "experiment": experiment,
            "git_commit": m.git_commit,
            "config_digest": m.config_digest,
            "tracking_uri": m.tracking_uri,
            "metrics_json": os.fspath(path),
        })
    return pd.DataFrame(rows, columns=PROVENANCE_COLUMNS)


def commits_frame(prov: pd.DataFrame) -> pd.DataFrame:
    """The commits of the runs in a provenance table: ``commit``, ``runs``, ``rules`` (sorted,
    joined by ``, ``), most runs first (then by commit)."""
    import pandas as pd

    if prov.empty:
        return pd.DataFrame(columns=["commit", "runs", "rules"])
    p = prov.assign(git_commit=prov["git_commit"].fillna("unknown"), rule=prov["rule"].fillna("?"))
    out = (p.groupby("git_commit")
           .agg(runs=("run_id", "size"), rules=("rule", lambda r: ", ".join(sorted(set(r)))))
           .reset_index().rename(columns={"git_commit": "commit"}))
    return out.sort_values(["runs", "commit"], ascending=[False, True], kind="stable").reset_index(drop=True)


def commit_label(provenance_csv: str | os.PathLike, half: str) -> str:
    """The commits behind one half's numbers as one line (``3f2a1bc0 (12 runs), ...``; commits
    shortened to 12 characters), from a provenance table; "not recorded" when the table or its
    runs are missing. A label of each result in the Snakemake report."""
    import pandas as pd

    try:
        prov = pd.read_csv(provenance_csv, dtype=str, keep_default_na=False)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return "not recorded"
    rules = HALF_RULES.get(half)
    if rules is not None:
        prov = prov[prov["rule"].isin(rules)]
    if prov.empty:
        return "not recorded"
    commits = commits_frame(prov.replace({"git_commit": {"": None}}))
    return ", ".join(f"{c[:12]} ({n} run{'s' if n != 1 else ''})" for c, n in zip(commits["commit"], commits["runs"], strict=True))


# --------------------------------------------------------------------------- HTML views
_STYLE = """body{font-family:system-ui,sans-serif;margin:1.2em;color:#111;background:#fff}
h1{font-size:1.1em;margin:0 0 .3em}p{margin:.3em 0 .8em;color:#444;font-size:.9em}
table{border-collapse:collapse;font-size:.85em}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left}
th{background:#eee}pre{font-size:.85em;background:#f6f6f6;padding:.8em}"""


def _table_html(path: Path) -> str:
    import pandas as pd

    if path.suffix == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False)  # the file's own text, not reformatted
        return df.to_html(index=False, border=0, classes="table", escape=True)
    text = path.read_text()
    if path.suffix == ".json":
        text = json.dumps(json.loads(text), indent=2)
    return f"<pre>{html.escape(text)}</pre>"


def view_html(path: Path, entry: ReportFile) -> str:
    """A self-contained HTML page: the table, and the file itself as a download link."""
    data = base64.b64encode(path.read_bytes()).decode()
    mime = {".csv": "text/csv", ".json": "application/json", ".md": "text/markdown"}.get(path.suffix, "text/plain")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(entry.name)}</title><style>{_STYLE}</style></head><body>\n"
        f"<h1>{html.escape(entry.name)}</h1>\n<p>{html.escape(entry.shows)}. "
        f"<a download=\"{html.escape(entry.name)}\" href=\"data:{mime};base64,{data}\">Download {html.escape(entry.name)}</a></p>\n"
        f"{_table_html(path)}\n</body></html>\n"
    )


def write_views(out_dir: Path, files: Iterable[ReportFile]) -> list[Path]:
    """Write the HTML view of each table in ``files`` (``out_dir/view/<stem>.html``); their paths.
    Raises FileNotFoundError naming a table the report did not write."""
    written = []
    for f in files:
        if f.view is None:
            continue
        src = out_dir / f.name
        if not src.is_file():
            raise FileNotFoundError(f"{src} is missing: the report lists it (finetail.report_files) but did not write it")
        dst = out_dir / f.view
        dst.parent.mkdir(parents=True, exist_ok=True)
        page = view_html(src, f)
        atomic_write(dst, lambda tmp, page=page: tmp.write_text(page))
        written.append(dst)
    return written


def finish_report(out_dir: Path, spec: Mapping, results: Path, metrics: list[str] | None,
                  experiment: str | None) -> list[Path]:
    """After :func:`finetail.report.build_report`: the provenance tables and the HTML views.

    ``metrics``: the ``metrics.json`` of every training run behind the report (the report
    rule passes its inputs); None: every one under ``results`` (for a report built by hand).
    """
    if metrics is None:
        layout = Layout.at(results)
        metrics = sorted(p for rule in TRAINING for p in glob.glob(layout.train_glob(rule)))
    prov = provenance_frame(metrics, experiment)
    written = []
    for name, df in (("provenance.csv", prov), ("commits.csv", commits_frame(prov))):
        atomic_write(out_dir / name, lambda tmp, df=df: df.to_csv(tmp, index=False))
        written.append(out_dir / name)
    written += write_views(out_dir, report_files(halves_of(spec)))
    return written
