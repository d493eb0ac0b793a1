"""Results pages rendered from committed tables, never typed: ``docs/results.md`` and the
README's results block.

A finished study's report tables are *published* into ``docs/results/<name>_<table>.csv``,
each with ``#`` lines at its top naming the commit, date, CPU model, replicates and wall time
of the run that made it. The pages are *rendered* from those files only, so a number in the
docs is always the number of a committed run; ``check`` fails when a page differs from its
rendering (a test runs it).

    python -m finetail.results_page publish results/default/report --name default --wall-s 512
    python -m finetail.results_page render     # writes docs/results.md and the README block
    python -m finetail.results_page check      # exit 1 if either differs from its rendering
"""

from __future__ import annotations

import argparse
import json
import io
import math
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

__all__ = ["TABLES", "check", "cpu_model", "git_commit", "publish", "read_table", "render_page",
           "render_readme_block", "render_speed_block"]

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
PAGE = DOCS / "results.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:default:begin (rendered by python -m finetail.results_page render) -->", \
    "<!-- results:default:end -->"
SPEED_BEGIN, SPEED_END = "<!-- speed:default:begin (rendered by python -m finetail.results_page render) -->", \
    "<!-- speed:default:end -->"

# The report tables a results page reads.
TABLES = ("claims.csv", "cbloss_methods.csv", "transfer_table.csv", "selection_vs_random.csv", "transferability.csv")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """The checkout's commit, and whether tracked files had uncommitted changes."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def publish(report: Path, name: str, wall_s: float | None, out: Path = RESULTS, speed: Path | None = None) -> list[Path]:
    """Copy ``report``'s :data:`TABLES` to ``out/<name>_<table>`` with the run's header lines
    (and ``speed``, a ``bench/bench_study.py --compare-worker`` JSON, to ``out/<name>_speed.json``)."""
    claims = pd.read_csv(report / "claims.csv")
    replicates = int(claims["replicates"].max()) if len(claims) else 0
    header = [f"# commit: {git_commit()}", f"# date: {datetime.now(UTC).strftime('%Y-%m-%d')}",
              f"# cpu: {cpu_model()} ({os.cpu_count()} cores)", f"# replicates: {replicates}",
              f"# study: {report.parent.name}"]
    if wall_s is not None:
        header.append(f"# wall_s: {wall_s:.0f}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table in TABLES:
        src = report / table
        if not src.is_file():
            continue
        dst = out / f"{name}_{table}"
        dst.write_text("\n".join(header) + "\n" + src.read_text())
        written.append(dst)
    if speed is not None:
        dst = out / f"{name}_speed.json"
        dst.write_text(Path(speed).read_text())
        written.append(dst)
    return written


def read_table(path: Path) -> tuple[dict[str, str], pd.DataFrame]:
    """A published table: its ``#`` header as a dict, and the table."""
    meta, body = {}, []
    for line in path.read_text().splitlines():
        if line.startswith("#") and not body:
            key, _, value = line[1:].partition(":")
            meta[key.strip()] = value.strip()
        else:
            body.append(line)
    return meta, pd.read_csv(io.StringIO("\n".join(body)))


def _ci(est: float, lo: float, hi: float, digits: int = 1) -> str:
    if math.isnan(lo):
        return f"{est:+.{digits}f}"
    return f"{est:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _pm(mean: float, std: float, digits: int = 1) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f}"


def _claims_lines(claims: pd.DataFrame) -> list[str]:
    head = claims[~claims["claim"].str.startswith(("cbloss:", "transfer:score:"))]
    head = head[~head["claim"].str.match(r"transfer:.*-vs-.*:(?!mean)")]
    rows = ["| claim | verdict | effect [interval] | holds in | P(better) | covers |", "|---|---|---|---|---|---|"]
    for r in head.itertuples():
        level = "" if abs(r.level - 0.95) < 1e-9 else f" ({100 * r.level:.1f}%)"
        rows.append(f"| {r.statement} | **{r.verdict}** | {_ci(r.estimate, r.low, r.high, 2)}{level} | "
                    f"{r.holds_in} of {r.replicates} | {r.p_improve:.2f} [{r.p_improve_low:.2f}, {r.p_improve_high:.2f}] "
                    f"| {r.sources} |")
    return rows


def _methods_lines(m: pd.DataFrame) -> list[str]:
    rows = ["| dataset | IF | method | top-1 error | balanced acc. | few-shot acc. |", "|---|---|---|---|---|---|"]
    for r in m.itertuples():
        rows.append(f"| {r.dataset} | {r.imbalance:g} | {r.setting} | {_pm(r.top1_error_mean, r.top1_error_std)} | "
                    f"{_pm(r.balanced_acc_mean, r.balanced_acc_std)} | {_pm(r.few_acc_mean, r.few_acc_std)} |")
    return rows


def _transfer_lines(t: pd.DataFrame) -> list[str]:
    targets = [c[: -len("_mean")] for c in t.columns if c.endswith("_mean") and c != "mean"]
    rows = ["| source | " + " | ".join(targets) + " | mean |", "|---" * (len(targets) + 2) + "|"]
    for r in t.to_dict("records"):
        rows.append(f"| {r['source']} | " + " | ".join(_pm(r[f'{x}_mean'], r[f'{x}_std']) for x in targets)
                    + f" | {r['mean']:.1f} |")
    return rows


def _scores_lines(s: pd.DataFrame) -> list[str]:
    rows = ["| score | mean τ (replicate means) | τ per replicate (mean ± std) |", "|---|---|---|"]
    for r in s.itertuples():
        rows.append(f"| {r.label} | {r.mean_tau:.2f} | {_pm(r.seed_tau_mean, r.seed_tau_std, 2)} |")
    return rows


def _provenance(meta: dict[str, str]) -> str:
    wall = f", {float(meta['wall_s']) / 60:.1f} minutes" if meta.get("wall_s") else ""
    return (f"Run of commit `{meta.get('commit', '?')[:12]}` on {meta.get('date', '?')}, {meta.get('cpu', '?')}, "
            f"{meta.get('replicates', '?')} replicates{wall}.")


def render_page(results: Path = RESULTS, name: str = "default") -> str:
    """``docs/results.md``: every published table of study ``name``, as Markdown."""
    meta, claims = read_table(results / f"{name}_claims.csv")
    out = [f"# Results of the `{name}` study", "",
           "Rendered by `python -m finetail.results_page render` from the tables in `docs/results/` "
           "(each carries the commit, date, CPU, replicates and wall time of its run); "
           "`python -m finetail.results_page check` (a test) fails when this page differs from them.", "",
           _provenance(meta), "", "## Claims", "", *_claims_lines(claims), ""]
    parts = [("cbloss_methods.csv", "## Long-tail methods (%, mean ± std over replicates)", _methods_lines),
             ("transfer_table.csv", "## Transfer: fine-tuned top-1 accuracy (%, mean ± std over replicates)",
              _transfer_lines),
             ("transferability.csv", "## Which score ranks the sources (within-target Kendall τ)", _scores_lines)]
    for table, title, fmt in parts:
        path = results / f"{name}_{table}"
        if path.is_file():
            out += [title, "", *fmt(read_table(path)[1]), ""]
    path = results / f"{name}_selection_vs_random.csv"
    if path.is_file():
        ab = read_table(path)[1]
        out += ["## Greedy selection vs random classes (points, paired over replicates)", "",
                "| target | selected − random [95% CI] | P(selected better) | verdict |", "|---|---|---|---|"]
        out += [f"| {r.target} | {_ci(r.selected_minus_random, r.ci_low, r.ci_high)} | "
                f"{r.p_improve:.2f} [{r.p_improve_low:.2f}, {r.p_improve_high:.2f}] | {r.verdict} |" for r in ab.itertuples()]
        out.append("")
    out += ["## Speed", "", *_speed_lines(results, name), ""]
    out += ["Every comparison (each loss against softmax per metric, each score against the best) is in "
            f"[`results/{name}_claims.csv`](results/{name}_claims.csv).", ""]
    return "\n".join(out)


def _speed_lines(results: Path, name: str) -> list[str]:
    """The study's wall time without and with the warm worker (``<name>_speed.json``)."""

    path = results / f"{name}_speed.json"
    if not path.is_file():
        return ["No speed figure published for this study."]
    sp = json.loads(path.read_text())
    m = sp.get("machine", {})
    walls = sp["wall_s"]
    rows = ["| `snakemake --cores 2` from an empty `results/` | wall time (s) | runs |", "|---|---|---|",
            f"| every job in its own interpreter (`FINETAIL_WORKER=off`) | {sp['median_wall_s']['inprocess']:.1f} | "
            f"{', '.join(f'{w:.1f}' for w in walls['inprocess'])} |",
            f"| through the warm local worker (the default) | {sp['median_wall_s']['worker']:.1f} | "
            f"{', '.join(f'{w:.1f}' for w in walls['worker'])} |"]
    out = [*rows, "", f"Ratio {sp['ratio_inprocess_over_worker']:.2f} (medians; runs alternated, each from a fresh "
           f"folder) by `bench/bench_study.py --compare-worker {len(walls['worker'])}` on {sp.get('date', '?')}, "
           f"commit `{str(sp.get('commit', '?'))[:12]}`, {m.get('processor', '?')} ({m.get('cpus', '?')} cores), "
           f"torch {m.get('torch', '?')}."]
    startup = results / "startup.json"
    if startup.is_file():
        st = json.loads(startup.read_text())
        n = len(st.get("runs", {}).get("total", [])) or "?"
        out += ["", f"A tiny `finetail train` job, start to end (`bench/startup.py --runs {n}`, "
                f"medians, alternated): **{st['whole_job_inprocess_s']:.2f} s** in its own interpreter, "
                f"**{st['whole_job_worker_s']:.2f} s** through the worker (its first step after "
                f"{st['train_to_first_step_s']:.2f} s and {st['worker_to_first_step_s']:.2f} s); {st.get('cpu_model', '?')}, "
                f"1-minute load {st.get('load_1min_before', float('nan')):.1f} before the runs."]
    return out


def render_speed_block(results: Path = RESULTS, name: str = "default") -> str:
    """The README's speed block: the default study's wall time without and with the worker."""
    return "\n".join([SPEED_BEGIN, *_speed_lines(results, name), SPEED_END])


def render_readme_block(results: Path = RESULTS, name: str = "default") -> str:
    """The README's results block: the run's provenance and its claims table."""
    meta, claims = read_table(results / f"{name}_claims.csv")
    return "\n".join([BEGIN, _provenance(meta), "", *_claims_lines(claims), "", END])


def _with_block(readme: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    if begin not in readme or end not in readme:
        raise ValueError(f"{README}: no rendered block ({begin} ... {end})")
    a, b = readme.index(begin), readme.index(end) + len(end)
    return readme[:a] + block + readme[b:]


def _rendered_readme(text: str, results: Path) -> str:
    text = _with_block(text, render_readme_block(results))
    return _with_block(text, render_speed_block(results), SPEED_BEGIN, SPEED_END)


def check(results: Path = RESULTS) -> list[str]:
    """The pages that differ from their rendering (empty: all match)."""
    bad = []
    if not PAGE.is_file() or PAGE.read_text() != render_page(results):
        bad.append(str(PAGE))
    if _rendered_readme(README.read_text(), results) != README.read_text():
        bad.append(f"{README} (results or speed block)")
    return bad


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m finetail.results_page", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish", help="copy a report's tables into docs/results/ with the run's header lines")
    pub.add_argument("report", type=Path, help="results/<study>/report")
    pub.add_argument("--name", default="default")
    pub.add_argument("--wall-s", type=float, default=None, help="the study's wall time, seconds")
    pub.add_argument("--speed", type=Path, default=None, help="bench/out/study_worker.json (bench_study.py --compare-worker)")
    sub.add_parser("render", help="write docs/results.md and the README's results block from docs/results/")
    sub.add_parser("check", help="exit 1 when docs/results.md or the README block differ from their rendering")
    a = p.parse_args(argv)
    if a.cmd == "publish":
        for path in publish(a.report, a.name, a.wall_s, speed=a.speed):
            print(f"wrote {path}")
    elif a.cmd == "render":
        PAGE.write_text(render_page())
        README.write_text(_rendered_readme(README.read_text(), RESULTS))
        print(f"wrote {PAGE} and the results block of {README}")
    else:
        bad = check()
        for b in bad:
            print(f"differs from its rendering: {b} (run: python -m finetail.results_page render)", file=sys.stderr)
        raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
