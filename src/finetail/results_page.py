"""Results pages rendered from committed tables, never typed: ``docs/results.md`` (the
default study), ``docs/results_<study>.md`` (every other published study) and the README's
results blocks.

A finished study's report tables are *published* into ``docs/results/<name>_<table>.csv``,
each with ``#`` lines at its top naming the commit, date, CPU model, replicates and wall time
of the run that made it. The pages are *rendered* from those files only, so a number in the
docs is always the number of a committed run; ``check`` fails when a page differs from its
rendering (a test runs it).

    python -m finetail.results_page publish results/default/report --name default --wall-s 512
    python -m finetail.results_page publish results/cifar10lt_cpu/report --name cifar10lt_cpu \
        --wall-s 1800 --extra bench/out/cpu_recipe.json:throughput.json
    python -m finetail.results_page render     # writes the pages and the README blocks
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

__all__ = ["TABLES", "check", "cpu_model", "git_commit", "page_path", "publish", "read_table", "render_page",
           "render_readme_block", "render_speed_block", "studies"]

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
PAGE = DOCS / "results.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:default:begin (rendered by python -m finetail.results_page render) -->", \
    "<!-- results:default:end -->"


def block_marks(name: str) -> tuple[str, str]:
    """The README's begin and end marks of study ``name``'s results block."""
    return (f"<!-- results:{name}:begin (rendered by python -m finetail.results_page render) -->",
            f"<!-- results:{name}:end -->")
SPEED_BEGIN, SPEED_END = "<!-- speed:default:begin (rendered by python -m finetail.results_page render) -->", \
    "<!-- speed:default:end -->"

# The report tables a results page reads.
TABLES = ("claims.csv", "cbloss_methods.csv", "transfer_table.csv", "selection_vs_random.csv", "transferability.csv")
# The report figures a results page shows (copied as they are: PNGs of the same run).
FIGURES = ("cbloss_few_vs_many.png",)


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


def publish(report: Path, name: str, wall_s: float | None, out: Path = RESULTS, speed: Path | None = None,
            extra: dict[str, Path] | None = None, commit: str | None = None, note: str | None = None) -> list[Path]:
    """Copy ``report``'s :data:`TABLES` to ``out/<name>_<table>`` with the run's header lines
    (and ``speed``, a ``bench/bench_study.py --compare-worker`` JSON, to ``out/<name>_speed.json``;
    each ``extra`` file, a benchmark's output, to ``out/<name>_<key>``). ``commit``: the commit
    that made the run, when it is not this checkout's; ``note``: how the run was made (e.g. what
    else ran on the machine), shown beside its provenance."""
    claims = pd.read_csv(report / "claims.csv")
    replicates = int(claims["replicates"].max()) if len(claims) else 0
    header = [f"# commit: {commit or git_commit()}", f"# date: {datetime.now(UTC).strftime('%Y-%m-%d')}",
              f"# cpu: {cpu_model()} ({os.cpu_count()} cores)", f"# replicates: {replicates}",
              f"# study: {report.parent.name}"]
    if wall_s is not None:
        header.append(f"# wall_s: {wall_s:.0f}")
    if note:
        header.append(f"# note: {' '.join(note.split())}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table in TABLES:
        src = report / table
        if not src.is_file():
            continue
        dst = out / f"{name}_{table}"
        dst.write_text("\n".join(header) + "\n" + src.read_text())
        written.append(dst)
    for figure in FIGURES:
        if (report / figure).is_file():
            dst = out / f"{name}_{figure}"
            dst.write_bytes((report / figure).read_bytes())
            written.append(dst)
    for key, src in ({"speed.json": speed} if speed is not None else {}) | (extra or {}).items():
        dst = out / f"{name}_{key}"
        dst.write_text(Path(src).read_text())
        written.append(dst)
    return written


def studies(results: Path = RESULTS) -> list[str]:
    """The published studies (those with a ``<name>_claims.csv``), ``default`` first."""
    names = sorted(p.name[: -len("_claims.csv")] for p in results.glob("*_claims.csv"))
    return sorted(names, key=lambda n: n != "default")


def page_path(name: str) -> Path:
    """Study ``name``'s page: ``docs/results.md`` for the default study, else ``docs/results_<name>.md``."""
    return PAGE if name == "default" else DOCS / f"results_{name}.md"


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


def _versus_lines(claims: pd.DataFrame) -> list[str]:
    """Each method against softmax (the ``cbloss:…-vs-softmax:…`` comparisons): one row per
    method, one column per metric, the paired difference over replicates and its verdict."""
    rows = claims[claims["claim"].str.match(r"cbloss:.*-vs-softmax:")].copy()
    if rows.empty:
        return []
    parts = rows["claim"].str.extract(r"cbloss:(?P<dataset>[^:]+):if(?P<imbalance>[^:]+):(?P<method>.+)-vs-softmax:(?P<metric>.+)")
    rows = pd.concat([rows, parts], axis=1)
    names = {"top1_error": "top-1 error", "balanced_acc": "balanced acc.", "few_acc": "few-shot acc."}
    metrics = [m for m in names if m in set(rows["metric"])]
    out = ["| dataset | IF | method − softmax | " + " | ".join(names[m] for m in metrics) + " |",
           "|---|---|---|" + "---|" * len(metrics)]
    for (ds, imb, method), g in rows.groupby(["dataset", "imbalance", "method"], sort=False):
        cells = []
        for m in metrics:
            r = g[g["metric"] == m]
            if r.empty:
                cells.append("")
                continue
            r = r.iloc[0]
            verdict = r["verdict"] if isinstance(r["verdict"], str) and r["verdict"] else "not tested"
            cells.append(f"{_ci(r['estimate'], r['low'], r['high'])} **{verdict}**")
        out.append(f"| {ds} | {imb} | {method} | " + " | ".join(cells) + " |")
    return out


def _throughput_lines(results: Path, name: str) -> list[str]:
    """The CPU throughput options measured for the study's recipe (``<name>_throughput.json``,
    ``bench/cpu_recipe.py``'s output)."""
    path = results / f"{name}_throughput.json"
    if not path.is_file():
        return []
    t = json.loads(path.read_text())
    out = ["| torch threads | batch | precision | memory format | images/s | vs first | each round | test error after "
           f"{t['epochs']} epochs |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| {v['threads']} | {v['batch_size']} | {v['precision']} | {v['memory_format']} | {v['images_per_s']:.0f} | "
            f"{v['ratio_to_first']:.2f} | {', '.join(f'{r:.0f}' for r in v['rounds'])} | {100 * v['top1_error']:.1f}% |"
            for v in t["variants"]]
    out += ["", f"`{t['command']}` on {t['date']}: {t['cpu']} ({t['cpus']} cores; bf16 flags: "
            f"{', '.join(t['cpu_bf16_flags']) or 'none'}), torch {t['torch']}, {t['train_images']:,} training images, "
            f"{t['rounds']} alternated rounds ({t['measured']}); 1-minute load average after the runs "
            f"{t.get('loadavg_1min_after', float('nan')):.1f}: rounds that differ widely ran beside other work."]
    return out


def _precision_lines(results: Path, name: str) -> list[str]:
    """The recipe's precision check (``<name>_precision.csv``, ``bench/precision_check.py``)."""
    path = results / f"{name}_precision.csv"
    if not path.is_file():
        return []
    meta, t = read_table(path)
    out = ["| metric | bf16 (study) | fp32 (check) | bf16 − fp32 [95% CI] | verdict |", "|---|---|---|---|---|"]
    out += [f"| {r.metric} | {_pm(r.bf16_mean, r.bf16_std)} | {_pm(r.fp32_mean, r.fp32_std)} | "
            f"{_ci(r.difference, r.low, r.high)} | {r.verdict} |" for r in t.itertuples()]
    out += ["", f"Softmax cells, paired by replicate ({meta.get('replicates', '?')} replicates, the same long-tailed "
            f"subsets and seeds), {meta.get('note', '')}".rstrip()]
    return out


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
    note = f" {meta['note'].rstrip('.')}." if meta.get("note") else ""
    return (f"Run of commit `{meta.get('commit', '?')[:12]}` on {meta.get('date', '?')}, {meta.get('cpu', '?')}, "
            f"{meta.get('replicates', '?')} replicates{wall}.{note}")


def render_page(results: Path = RESULTS, name: str = "default") -> str:
    """Study ``name``'s page (:func:`page_path`): every published table of it, as Markdown."""
    meta, claims = read_table(results / f"{name}_claims.csv")
    out = [f"# Results of the `{name}` study", "",
           "Rendered by `python -m finetail.results_page render` from the tables in `docs/results/` "
           "(each carries the commit, date, CPU, replicates and wall time of its run); "
           "`python -m finetail.results_page check` (a test) fails when this page differs from them.", "",
           _provenance(meta), ""]
    others = [n for n in studies(results) if n != name] if name == "default" else []
    if others:
        out += ["Other published studies: " + ", ".join(f"[`{n}`]({page_path(n).name})" for n in others) + ".", ""]
    head = _claims_lines(claims)
    if len(head) > 2:
        out += ["## Claims", "", *head, ""]
    versus = _versus_lines(claims)
    if versus:
        out += ["## Each method against softmax (points, paired over replicates, 95% CI)", "", *versus, ""]
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
    precision = _precision_lines(results, name)
    if precision:
        out += ["## Precision of the recipe: bf16 autocast against fp32", "", *precision, ""]
    throughput = _throughput_lines(results, name)
    if throughput:
        out += ["## CPU throughput options (one training job)", "", *throughput, ""]
    if (results / f"{name}_speed.json").is_file() or name == "default":
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
    """The README's results block of study ``name``: the run's provenance and its claims
    table (the default study), or its methods table and each method against softmax."""
    meta, claims = read_table(results / f"{name}_claims.csv")
    begin, end = block_marks(name)
    if name == "default":
        return "\n".join([begin, _provenance(meta), "", *_claims_lines(claims), "", end])
    body = [_provenance(meta), ""]
    methods = results / f"{name}_cbloss_methods.csv"
    if methods.is_file():
        body += ["Errors and accuracies (%, mean ± std over replicates):", "", *_methods_lines(read_table(methods)[1]), ""]
    versus = _versus_lines(claims)
    if versus:
        body += ["Each method against softmax (points, paired over replicates, 95% CI, verdict):", "", *versus, ""]
    return "\n".join([begin, *body, f"More: [`{page_path(name).relative_to(ROOT)}`]({page_path(name).relative_to(ROOT)}).",
                      end])


def _with_block(readme: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    if begin not in readme or end not in readme:
        raise ValueError(f"{README}: no rendered block ({begin} ... {end})")
    a, b = readme.index(begin), readme.index(end) + len(end)
    return readme[:a] + block + readme[b:]


def _rendered_readme(text: str, results: Path) -> str:
    for name in studies(results):
        text = _with_block(text, render_readme_block(results, name), *block_marks(name))
    return _with_block(text, render_speed_block(results), SPEED_BEGIN, SPEED_END)


def check(results: Path = RESULTS) -> list[str]:
    """The pages that differ from their rendering (empty: all match)."""
    bad = []
    for name in studies(results):
        page = page_path(name)
        if not page.is_file() or page.read_text() != render_page(results, name):
            bad.append(str(page))
    if _rendered_readme(README.read_text(), results) != README.read_text():
        bad.append(f"{README} (results or speed blocks)")
    return bad


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m finetail.results_page", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish", help="copy a report's tables into docs/results/ with the run's header lines")
    pub.add_argument("report", type=Path, help="results/<study>/report")
    pub.add_argument("--name", default="default")
    pub.add_argument("--wall-s", type=float, default=None, help="the study's wall time, seconds")
    pub.add_argument("--speed", type=Path, default=None, help="bench/out/study_worker.json (bench_study.py --compare-worker)")
    pub.add_argument("--commit", default=None, help="the commit that made the run (default: this checkout's)")
    pub.add_argument("--note", default=None, help="how the run was made, shown beside its provenance")
    pub.add_argument("--extra", action="append", default=[], metavar="FILE:KEY",
                     help="a benchmark's output published as docs/results/<name>_<KEY> (throughput.json, precision.csv)")
    sub.add_parser("render", help="write the results pages and the README's blocks from docs/results/")
    sub.add_parser("check", help="exit 1 when a results page or a README block differs from its rendering")
    a = p.parse_args(argv)
    if a.cmd == "publish":
        extra = {}
        for item in a.extra:
            src, sep, key = item.rpartition(":")
            if not sep or not src or not key:
                p.error(f"--extra {item!r}: expected FILE:KEY")
            extra[key] = Path(src)
        for path in publish(a.report, a.name, a.wall_s, speed=a.speed, extra=extra, commit=a.commit, note=a.note):
            print(f"wrote {path}")
    elif a.cmd == "render":
        for name in studies():
            page_path(name).write_text(render_page(RESULTS, name))
            print(f"wrote {page_path(name)}")
        README.write_text(_rendered_readme(README.read_text(), RESULTS))
        print(f"wrote the results blocks of {README}")
    else:
        bad = check()
        for b in bad:
            print(f"differs from its rendering: {b} (run: python -m finetail.results_page render)", file=sys.stderr)
        raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
