"""The study's report: tables and figures from every ``metrics.json``, the papers' numbers beside ours.

Everything here reads result files only (never the tracking store), so a report can be
rebuilt from ``results/`` alone.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from . import published
from .claims import Claim, comparison, mean_claim, pooled_claim, write_claims
from .fileio import atomic_write
from .layout import Layout
from .record import MetricsRecord
from .replicates import Replicates, covered_words
from .stats import format_mean_std, paired_difference, prob_improvement, summarize
from .training.recipe import CB_LOSS_TYPES, paper_recipe

__all__ = ["build_report", "cbloss_frame", "cbloss_table", "paired_table", "paper_table", "similarity_network_label",
           "to_markdown", "transfer_frame"]

PAPER_CIFAR = {"cifar10", "cifar100"}


def replicates_of(spec: dict) -> Replicates:
    """The study's replicates (the report's spec carries ``replicates``, ``datasets`` and ``transfer``)."""
    return Replicates.of(spec)


def replicate_ids(spec: dict) -> list[int]:
    return list(replicates_of(spec).ids)


def covers(spec: dict, half: str, datasets, random_source: bool = False) -> str:
    """The sources of variation an interval over this study's replicates covers, in words."""
    return covered_words(replicates_of(spec).covers(half, list(datasets), random_source))


def paper_table(name: str) -> pd.DataFrame:
    """A reference table shipped with the package (``finetail/reference/<name>.csv``)."""
    with resources.files("finetail").joinpath("reference", f"{name}.csv").open() as f:
        return pd.read_csv(f, comment="#")


def to_markdown(df: pd.DataFrame, floatfmt: str = "{:.2f}") -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    cols = list(df.columns)

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "—"
        if isinstance(v, float | np.floating):
            return floatfmt.format(v)
        return str(v)

    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def is_class_balanced(spec: dict) -> bool:
    """A class-balanced loss of Cui et al. (softmax, sigmoid or focal with β > 0 from the
    first epoch): not LDAM, not the DRW settings, whose β switches on late."""
    return spec["type"] in CB_LOSS_TYPES and bool(spec.get("beta", 0.0)) and spec.get("drw_epoch") is None


def _loss_label(spec: dict) -> str:
    t, beta, gamma = spec["type"], spec.get("beta", 0.0), spec.get("gamma", 0.0)
    drw = f"-DRW (β={beta:g} from epoch {spec['drw_epoch']})" if spec.get("drw_epoch") is not None else ""
    if t == "ldam":
        return f"LDAM m={spec.get('max_margin', 0.5):g} s={spec.get('scale', 30.0):g}{drw}"
    if t == "balanced_softmax":
        return "balanced softmax"
    if t == "logit_adjusted":
        return f"logit-adjusted loss τ={spec.get('tau', 1.0):g}"
    if t == "plugin":
        return _plugin_call(spec["plugin"], spec.get("params"))
    s = t if t != "focal" else f"focal γ={gamma:g}"
    if drw:
        return s + drw
    return s if not beta else f"CB {s} β={beta:g}"


POSTHOC_LABELS = {"tau_norm": "τ-norm", "logit_adjust": "post-hoc logit adjustment", "crt": "cRT"}


def _plugin_call(ref: str, params: dict | None) -> str:
    """A plugin as a row label names it: ``ref (key=value, ...)``."""
    args = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in (params or {}).items())
    return f"{ref} ({args})" if args else ref


def plugin_mark(runs: list[tuple[Path, MetricsRecord]]) -> str:
    """The mark of a plugin's row: `` [plugin, <distribution> <version>]`` (installed) or
    `` [plugin, code <digest>]``, from the ``plugin`` record of its runs (``metrics.json``). Runs
    of one row that ran different code of their plugin (or none) raise, naming the files:
    their numbers cannot be averaged."""
    digests: dict[str | None, Path] = {}
    for path, m in runs:
        digests.setdefault((m.extra.get("plugin") or {}).get("digest"), path)
    if None in digests:
        raise ValueError(f"{digests[None]} records no plugin, but its setting names one: rerun that job")
    if len(digests) > 1:
        raise ValueError("the runs of one row ran different code of their plugin ("
                         + ", ".join(f"{d} in {p}" for d, p in digests.items()) + "): rerun the stale ones")
    info = runs[0][1].extra["plugin"]
    if info.get("distribution"):
        return f" [plugin, {info['distribution']} {info.get('version') or '?'}]"
    return f" [plugin, code {info['digest']}]"


def _plugin_columns(m: MetricsRecord) -> dict:
    """A run's plugin, for cbloss_cells.csv: its ref, version (or None) and code digest."""
    info = m.extra.get("plugin") or {}
    return {"plugin": info.get("ref"), "plugin_version": info.get("version"), "plugin_digest": info.get("digest")}


def _posthoc_label(base: dict, ph: dict) -> str:
    if ph["method"] == "plugin":
        return f"{_loss_label(base)} + {_plugin_call(ph['plugin'], ph.get('params'))}"
    if ph["method"] == "crt":
        epochs = ph.get("recipe", {}).get("epochs")
        return (f"{_loss_label(base)} + cRT (new head on the frozen backbone, class-balanced sampling"
                + (f", {epochs} epochs)" if epochs else ")"))
    how = "chosen on held-out training images" if ph["tau"] == "auto" else f"τ={float(ph['tau']):g}, given"
    return f"{_loss_label(base)} + {POSTHOC_LABELS[ph['method']]} ({how})"


def _paper_row(spec: dict) -> str | None:
    """The row of the paper's Table 2 that an unweighted loss is (CB rows: see _paper_best)."""
    if spec.get("beta", 0.0) or spec["type"] not in CB_LOSS_TYPES or spec.get("drw_epoch") is not None:
        return None
    if spec["type"] == "focal":
        return f"focal_g{spec.get('gamma', 0.0):.1f}"
    return spec["type"]


def _same_setting(spec: dict, best: pd.Series) -> bool:
    """Whether a CB loss is the (loss, β, γ) behind the paper's best number of one column."""
    gamma = 0.0 if pd.isna(best["gamma"]) else float(best["gamma"])
    beta = 0.0 if pd.isna(best["beta"]) else float(best["beta"])
    return (spec["type"] == best["loss"] and np.isclose(spec.get("beta", 0.0), beta)
            and np.isclose(spec.get("gamma", 0.0), gamma))


BEST_CB = "best_cb"
BEST_CB_LABEL = "best CB (per column, chosen on the test set)"
SHOT_METRICS = ("top1_error", "balanced_acc", "many_acc", "medium_acc", "few_acc", "ece")


def cbloss_frame(results: Path, cb: dict, replicates: list[int]) -> pd.DataFrame:
    """One row per CB-loss run (cell x replicate, column ``seed``): settings and final metrics (percentages); then
    one per post-hoc job (``cbloss.posthoc``): loss ``<loss>+<name>``, the corrected cell's
    settings, its metrics, and the τ it used (``tau``) and how it was chosen (``tau_source``).
    A plugin's rows (:mod:`finetail.plugins`) are labelled with its name and parameters and
    marked ``[plugin, <distribution> <version>]`` (or ``[plugin, code <digest>]``), from the
    runs' records; columns ``plugin``, ``plugin_version``, ``plugin_digest``."""
    rows = []
    layout = Layout.at(results)
    marks: dict[tuple, str] = {}  # (dataset, imbalance, loss) -> a plugin loss's mark
    for ds in cb["datasets"]:
        for imb in cb["imbalance"]:
            for name, spec in cb["losses"].items():
                runs = []
                for seed in replicates:
                    path = Path(layout.train("cbloss", dataset=ds, imbalance=imb, loss=name, seed=seed))
                    row, m = _run_row(path, "cbloss", ds, imb, name, _loss_label(spec), spec, seed)
                    rows.append({**row, **_plugin_columns(m)})
                    runs.append((path, m))
                if spec["type"] == "plugin":
                    marks[(ds, imb, name)] = plugin_mark(runs)
                    for row in rows[-len(runs):]:
                        row["setting"] += marks[(ds, imb, name)]
    for name, ph in (cb.get("posthoc") or {}).items():
        for ds in cb["datasets"]:
            for imb in cb["imbalance"]:
                for loss in ph["losses"]:
                    spec = cb["losses"][loss]
                    runs = []
                    for seed in replicates:
                        path = Path(layout.train("posthoc", dataset=ds, imbalance=imb, loss=loss, method=name, seed=seed))
                        row, m = _run_row(path, "posthoc", ds, imb, f"{loss}+{name}", _posthoc_label(spec, ph), spec, seed)
                        how = m.extra.get("posthoc", {})
                        rows.append({**row, "tau": how.get("tau"), "tau_source": how.get("source"),
                                     **_plugin_columns(m)})
                        runs.append((path, m))
                    base = marks.get((ds, imb, loss), "")
                    mark = plugin_mark(runs) if ph["method"] == "plugin" else ""
                    for row in rows[-len(runs):]:
                        row["setting"] = row["setting"].replace(" + ", base + " + ", 1) + mark
    return pd.DataFrame(rows)


def _run_row(path: Path, rule: str, ds: str, imb, loss: str, setting: str, spec: dict,
             seed: int) -> tuple[dict, MetricsRecord]:
    """One long-tail run's row of :func:`cbloss_frame` (its ``metrics.json`` at ``path``), and
    its record."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the {rule} job for this cell and replicate first")
    m = MetricsRecord.read(path)
    f = m.final or {}
    row = {
        "dataset": ds, "imbalance": float(imb), "loss": loss, "setting": setting,
        "type": spec["type"], "beta": spec.get("beta", 0.0), "gamma": spec.get("gamma", 0.0),
        "seed": int(seed), **{k: _pct(f.get(k), path, k) for k in SHOT_METRICS},
        "run_id": m.run_id, "git_commit": m.git_commit, "wall_s": m.wall_s,
        **published.best_on_test(path),  # the best evaluation, chosen on the test set: for best-on-test papers
    }
    return row, m


def _pct(v, path: Path | str, key: str) -> float:
    """A metric of ``path``'s run in percent; NaN stands for *absent* (None in the file: e.g.
    few-shot accuracy where no class is few-shot). A metric the run recorded as NaN or inf
    raises, naming the file: a diverged or damaged result never reaches a table."""
    if v is None:
        return np.nan
    v = float(v)
    if not np.isfinite(v):
        raise ValueError(f"{path}: {key} is {v}; a result that is not a finite number cannot be reported "
                         "(rerun that job: snakemake --forcerun on this file)")
    return 100.0 * v


def _cell_stats(df: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    """mean, std, n of ``metric`` over the replicates of each ``keys`` cell. NaN here means
    absent (:func:`_pct` refused non-finite values already); a metric absent from some
    replicates of a cell but not from all of them raises, since its mean would silently be over
    fewer replicates."""
    rows = []
    for key, g in df.groupby(keys, sort=False):
        vals = g[metric].dropna()
        if 0 < len(vals) < len(g):
            raise ValueError(f"{metric} of {dict(zip(keys, key, strict=True))} is absent from "
                             f"{len(g) - len(vals)} of its {len(g)} runs: its mean would be over fewer replicates")
        s = summarize(vals.tolist()) if len(vals) else None
        rows.append({**dict(zip(keys, key, strict=True)), "mean": s.mean if s else np.nan,
                     "std": s.std if s else np.nan, "n": s.n if s else 0})
    return pd.DataFrame(rows)


def _best_cb(df: pd.DataFrame, cb: dict) -> pd.DataFrame:
    """The paper's way: per (dataset, imbalance), the class-balanced loss with the lowest mean
    top-1 error over the grid's β and loss settings, chosen on the test set. Its runs, with
    ``loss = best_cb`` and ``choice`` naming the loss chosen."""
    cbs = [n for n, spec in cb["losses"].items() if is_class_balanced(spec)]
    out = []
    for _, g in df[df["loss"].isin(cbs)].groupby(["dataset", "imbalance"], sort=False):
        means = g.groupby("loss", sort=False)["top1_error"].mean()
        pick = g[g["loss"] == means.idxmin()].copy()
        pick["choice"] = pick["loss"]
        pick["loss"], pick["setting"] = BEST_CB, BEST_CB_LABEL
        out.append(pick)
    return pd.concat(out, ignore_index=True) if out else df.iloc[0:0].assign(choice=[])


def cbloss_table(df: pd.DataFrame, cb: dict, paper_ok: dict[str, bool]) -> pd.DataFrame:
    """Table 2 shape: rows = (dataset, loss), columns per imbalance factor: mean, std, n of the
    top-1 error (%) over seeds; ``choice`` columns name the loss behind the best-CB row; the
    ``paper`` columns only where ``paper_ok[dataset]`` (our recipe is the paper's)."""
    best = _best_cb(df, cb)
    rows = pd.concat([df.assign(choice=None), best], ignore_index=True)
    stats = _cell_stats(rows, ["dataset", "loss", "setting", "imbalance"], "top1_error")
    choice = rows.drop_duplicates(["dataset", "loss", "imbalance"]).set_index(["dataset", "loss", "imbalance"])["choice"]
    paper, best_settings = paper_table("cbloss_cifar_table2"), paper_table("cbloss_cifar_best_settings")
    specs = {**cb["losses"]}
    out = []
    for (ds, loss, setting), g in stats.groupby(["dataset", "loss", "setting"], sort=False):
        row = {"dataset": ds, "loss": loss, "setting": setting}
        for _, r in g.iterrows():
            col = f"if{r['imbalance']:g}"
            row.update({f"{col}_mean": r["mean"], f"{col}_std": r["std"], f"{col}_n": int(r["n"])})
            if loss == BEST_CB:
                row[f"{col}_choice"] = choice.get((ds, loss, r["imbalance"]))
            if paper_ok.get(ds) and col in paper.columns:
                row[f"paper_{col}"] = _paper_value(paper, best_settings, ds, loss, specs.get(loss), col)
        out.append(row)
    return pd.DataFrame(out)


def _paper_value(paper: pd.DataFrame, best: pd.DataFrame, ds: str, loss: str, spec: dict | None, col: str) -> float:
    """The paper's number for our row, only where the row is the paper's setting: an
    unweighted loss its own row; the best-CB row, and the CB loss with exactly the (loss, β, γ)
    of the paper's best in that column, the paper's class-balanced best; NaN otherwise."""
    if loss == BEST_CB:
        key = "class_balanced_best"
    elif spec is None:
        return np.nan
    elif is_class_balanced(spec):
        hit = best[(best["dataset"] == ds) & (best["imbalance"] == float(col[2:]))]
        if not len(hit) or not _same_setting(spec, hit.iloc[0]):
            return np.nan
        key = "class_balanced_best"
    else:
        key = _paper_row(spec)
    hit = paper[(paper["dataset"] == ds) & (paper["loss"] == key)]
    return float(hit[col].iloc[0]) if len(hit) and col in hit.columns else np.nan


def cbloss_table_markdown(table: pd.DataFrame) -> str:
    """``mean ± std`` per imbalance factor, ``n`` in the cell when it is not the same everywhere."""
    cols = sorted({c.rsplit("_", 1)[0] for c in table.columns if c.startswith("if") and c.endswith("_mean")},
                  key=lambda c: float(c[2:]))
    ns = {int(v) for c in cols for v in table[f"{c}_n"].dropna()}
    md = pd.DataFrame({"dataset": table["dataset"], "setting": table["setting"]})
    for c in cols:
        cells = [format_mean_std(m, s) + ("" if len(ns) == 1 else f" (n={int(n)})")
                 for m, s, n in zip(table[f"{c}_mean"], table[f"{c}_std"], table[f"{c}_n"], strict=True)]
        if f"{c}_choice" in table.columns:
            cells = [v + (f" [{ch}]" if isinstance(ch, str) else "") for v, ch in zip(cells, table[f"{c}_choice"], strict=True)]
        md[f"IF {c[2:]}"] = cells
    for c in cols:
        if f"paper_{c}" in table.columns:
            md[f"paper IF {c[2:]}"] = table[f"paper_{c}"]
    return to_markdown(md)


def shots_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, imbalance, setting): mean, std, n of top-1 error, balanced, many-, medium-,
    few-shot accuracy and ECE (%)."""
    keys = ["dataset", "imbalance", "loss", "setting"]
    out = None
    for metric in SHOT_METRICS:
        st = _cell_stats(df, keys, metric).rename(columns={"mean": f"{metric}_mean", "std": f"{metric}_std", "n": f"{metric}_n"})
        out = st if out is None else out.merge(st, on=keys)
    return out


def _followup_key(loss: str, cb: dict) -> str | None:
    """The method of the published follow-ups (``reference/longtail_followups.csv``) that our
    setting ``loss`` is, by kind; its parameters and recipe are compared field by field by
    :func:`finetail.published.pair`. None when it is none of them."""
    return published.followup_method(loss, cb)


METHOD_METRICS = ("top1_error", "balanced_acc", "many_acc", "medium_acc", "few_acc")


def methods_table(shots: pd.DataFrame, cb: dict, paper_ok: dict[str, bool],
                  cells: pd.DataFrame | None = None) -> pd.DataFrame:
    """The long-tail methods side by side: per (dataset, imbalance, setting) the mean, std and
    n of top-1 error, balanced accuracy and many/medium/few-shot accuracy (%), and the
    published top-1 error (``published_error``, ``published_source``;
    ``reference/longtail_followups.csv``) only where the dataset is the real CIFAR
    (``paper_ok``) and the row's recipe and parameters are those of the published number
    (:mod:`finetail.published`); otherwise ``published_note`` names the first field that
    differs. Where the published number was chosen on the test set and ``cells`` (one row per
    run, with :func:`finetail.published.best_on_test`'s columns) are given, a best-on-test
    row follows the last-epoch one and gets the number."""
    pub = paper_table("longtail_followups")
    keep = ["dataset", "imbalance", "loss", "setting"]
    keep += [f"{m}_{k}" for m in METHOD_METRICS for k in ("mean", "std", "n")]
    out = shots[keep].copy()
    want = published.wanted_best(out, cb, paper_ok, pub) if cells is not None else []
    extra = published.best_rows(cells, want) if want else None
    best = shots_table(extra)[keep] if extra is not None and len(extra) else None
    return published.with_published(out, cb, paper_ok, pub, best)


def methods_markdown(methods: pd.DataFrame) -> str:
    """One table per dataset: rows = methods, per imbalance factor top-1 error, balanced
    accuracy and many / medium / few-shot accuracy (mean ± std; — where no class is in that group)."""
    parts = []
    for ds, g in methods.groupby("dataset", sort=False):
        md = pd.DataFrame({"setting": list(dict.fromkeys(g["setting"]))})
        for imb, h in g.groupby("imbalance", sort=True):
            h = h.set_index("setting").reindex(md["setting"])
            cell = lambda m, h=h: [format_mean_std(a, b) if n else "—"  # noqa: E731
                                   for a, b, n in zip(h[f"{m}_mean"], h[f"{m}_std"], h[f"{m}_n"], strict=True)]
            md[f"IF {imb:g} top-1 err"] = cell("top1_error")
            md[f"IF {imb:g} balanced acc"] = cell("balanced_acc")
            md[f"IF {imb:g} many / medium / few"] = [" / ".join(t) for t in zip(cell("many_acc"), cell("medium_acc"),
                                                                              cell("few_acc"), strict=True)]
            notes = h["published_note"] if "published_note" in h.columns else pd.Series(None, index=h.index)
            if h["published_error"].notna().any() or notes.notna().any():
                md[f"IF {imb:g} published err"] = [f"{v:.2f}" if pd.notna(v) else (n if isinstance(n, str) else "—")
                                                   for v, n in zip(h["published_error"], notes, strict=True)]
        parts.append(f"\n**{ds}**\n\n" + to_markdown(md))
    return "".join(parts)


def _plot_few_vs_many(methods: pd.DataFrame, path: Path) -> None:
    """Few-shot vs many-shot accuracy per method (mean ± std over seeds), one panel per
    (dataset, imbalance factor) that has both groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, g) for k, g in methods.groupby(["dataset", "imbalance"], sort=False)
              if g["few_acc_n"].gt(0).any() and g["many_acc_n"].gt(0).any()]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 4.2), squeeze=False)
    for ax, ((ds, imb), g) in zip(axes[0], panels, strict=False):
        for _, r in g.iterrows():
            ax.errorbar(r["many_acc_mean"], r["few_acc_mean"], xerr=np.nan_to_num(r["many_acc_std"]),
                        yerr=np.nan_to_num(r["few_acc_std"]), marker="o", capsize=3, ls="none", label=r["setting"])
        ax.set_xlabel("many-shot accuracy (%)")
        ax.set_ylabel("few-shot accuracy (%)")
        ax.set_title(f"{ds}, imbalance {imb:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no imbalance factor with both many- and few-shot classes", ha="center")
        axes[0][0].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _shots_markdown(shots: pd.DataFrame) -> str:
    md = shots[["dataset", "imbalance", "setting"]].copy()
    md["imbalance"] = [f"{v:g}" for v in md["imbalance"]]
    md["n"] = shots["top1_error_n"]
    for metric in SHOT_METRICS:
        if shots[f"{metric}_n"].sum():
            md[metric] = [format_mean_std(m, s) for m, s in zip(shots[f"{metric}_mean"], shots[f"{metric}_std"], strict=True)]
    return to_markdown(md)


PAIRED_METRICS = {"top1_error": True, "few_acc": False, "balanced_acc": False}  # metric -> lower is better
PAIRED_COLUMNS = ["dataset", "imbalance", "loss", "setting", "baseline", "metric", "difference", "ci_low", "ci_high",
                  "n", "verdict", "p", "p_improve", "p_improve_low", "p_improve_high"]
METRIC_WORDS = {"top1_error": "top-1 error", "few_acc": "few-shot accuracy", "balanced_acc": "balanced accuracy"}


def baseline_loss(cb: dict) -> str | None:
    """The baseline of the paired comparisons: the first unweighted softmax loss of the grid."""
    return next((n for n, s in cb["losses"].items()
                 if s["type"] == "softmax" and not s.get("beta", 0.0) and s.get("drw_epoch") is None), None)


def _pair(g: pd.DataFrame, loss: str, baseline: str, metric: str) -> tuple[list[float], list[float]] | None:
    """``loss`` and ``baseline``'s ``metric`` over the replicates both have, in replicate order;
    None where the metric is absent from every replicate of either (e.g. no few-shot class).
    Absent from some replicates only raises: the comparison would silently drop out of the
    claims (NaN here means absent; :func:`_pct` refused non-finite values already)."""
    a = g[g["loss"] == loss].set_index("seed")[metric]
    b = g[g["loss"] == baseline].set_index("seed")[metric]
    seeds = sorted(set(a.index) & set(b.index))
    if set(a.index) != set(b.index):
        raise ValueError(f"{loss} and {baseline} ran different replicates ({sorted(a.index)} vs {sorted(b.index)}): "
                         "a paired comparison needs the same ones")
    a, b = a.loc[seeds], b.loc[seeds]
    if a.isna().all() or b.isna().all():
        return None
    for name, v in ((loss, a), (baseline, b)):
        if v.isna().any():
            raise ValueError(f"{metric} of {name} is absent from replicate(s) {sorted(v.index[v.isna()])} of its "
                             f"{len(v)}: the comparison with {baseline if name == loss else loss} would silently "
                             "leave the claims")
    return a.tolist(), b.tolist()


def paired_table(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Every loss against ``baseline`` in each (dataset, imbalance) cell, paired over
    replicates: mean difference (points), its 95% CI, the verdict (better/worse only when the
    CI excludes 0), the paired t-test's p and P(better) over replicates with its interval."""
    rows = []
    for (ds, imb), g in df.groupby(["dataset", "imbalance"], sort=False):
        for loss, h in g[g["loss"] != baseline].groupby("loss", sort=False):
            for metric, lower in PAIRED_METRICS.items():
                pair = _pair(g, loss, baseline, metric)
                if pair is None:
                    continue
                d = paired_difference(*pair)
                imp = prob_improvement(*pair, higher_is_better=not lower)
                rows.append({"dataset": ds, "imbalance": imb, "loss": loss, "setting": h["setting"].iloc[0],
                             "baseline": baseline, "metric": metric, "difference": d.mean, "ci_low": d.low,
                             "ci_high": d.high, "n": d.n, "verdict": d.verdict(lower_is_better=lower), "p": d.p,
                             "p_improve": imp.p, "p_improve_low": imp.low, "p_improve_high": imp.high})
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)  # the columns even with nothing to compare


def comparison_claims(df: pd.DataFrame, baseline: str, sources: str) -> list[Claim]:
    """Every paired comparison of :func:`paired_table` as a row of ``claims.csv``."""
    rows = []
    for (ds, imb), g in df.groupby(["dataset", "imbalance"], sort=False):
        for loss, h in g[g["loss"] != baseline].groupby("loss", sort=False):
            for metric, lower in PAIRED_METRICS.items():
                pair = _pair(g, loss, baseline, metric)
                if pair is not None:
                    rows.append(comparison(
                        f"cbloss:{ds}:if{imb:g}:{loss}-vs-{baseline}:{metric}",
                        f"{h['setting'].iloc[0]} vs {baseline}, {METRIC_WORDS[metric]} (points), {ds} IF {imb:g}",
                        *pair, higher_is_better=not lower, sources=sources))
    return rows


def cb_claims(df: pd.DataFrame, cb: dict, baseline: str | None, sources) -> tuple[list[str], list[Claim]]:
    """The CB paper's qualitative claim, checked per dataset at its highest imbalance factor:
    some class-balanced loss beats softmax, on few-shot accuracy and on the paper's own metric
    (top-1 error), each a claim pooling the grid's K CB losses with Holm's correction.
    ``sources``: dataset -> the sources of variation in words. Returns summary lines and rows."""
    cbs = [n for n, s in cb["losses"].items() if is_class_balanced(s)]
    if baseline is None or not cbs:
        why = "no unweighted softmax baseline" if baseline is None else "no class-balanced loss in the grid"
        return [f"- Class-balanced weighting vs softmax: no paired comparison ({why}).\n"], []
    lines, rows = [], []
    for ds, g in df.groupby("dataset", sort=False):
        imb = g["imbalance"].max()
        top = g[g["imbalance"] == imb]
        for metric, what in (("few_acc", "raises few-shot accuracy"), ("top1_error", "lowers top-1 error")):
            members = {n: pair for n in cbs if (pair := _pair(top, n, baseline, metric)) is not None}
            if not members:
                continue
            claim, pick = pooled_claim(f"cb_helps:{ds}:if{imb:g}:{metric}",
                                       f"some CB loss {what} vs {baseline}, {ds} IF {imb:g} (Holm over {len(members)})",
                                       members, higher_is_better=not PAIRED_METRICS[metric], sources=sources[ds])
            rows.append(claim)
            lines.append(_claim_line(f"{ds}, imbalance {imb:g}: class-balanced weighting {what}", claim,
                                     f"{len(members)} CB loss(es), Holm-corrected; "
                                     + (f"deciding loss {pick}; " if pick else "") + "points"))
    return lines, rows


def _claim_line(title: str, c: Claim, unit: str) -> str:
    """A claim as the summary states it: verdict, effect with interval, k of R, P(better), sources."""
    level = "" if abs(c.level - 0.95) < 1e-9 else f" at Holm's {100 * c.level:.1f}% level"
    return (f"- **{title} — {c.verdict}**: {c.interval()}{level} ({unit}); holds in {c.holds_in} of "
            f"{c.replicates} replicates; {c.improvement()}; interval over replicates covering {c.sources}.\n")


def _plot_error_vs_if(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(df["dataset"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], sets, strict=True):
        part = df[df["dataset"] == ds]
        for (loss, setting), g in part.groupby(["loss", "setting"], sort=False):
            st = g.groupby("imbalance")["top1_error"].agg(["mean", "std"]).sort_index()
            ax.errorbar(st.index, st["mean"], yerr=st["std"].fillna(0), marker="o", capsize=3, label=setting)
        ax.set_xscale("log")
        ax.set_xticks(sorted(part["imbalance"].unique()))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("imbalance factor")
        ax.set_ylabel("top-1 error (%), mean ± std over seeds")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _per_class_mean(results: Path, ds: str, imb: float, loss: str, seeds: list[int]) -> pd.DataFrame:
    """Per-class accuracy averaged over replicates (the subset's class order and counts follow
    from the profile, the same in every replicate; a replicate whose counts differ fails)."""
    layout = Layout.at(results)
    frames = [pd.read_csv(layout.train("cbloss", "per_class.csv", dataset=ds, imbalance=imb, loss=loss, seed=s)) for s in seeds]
    for s, f in zip(seeds, frames, strict=True):
        if not f["train_count"].equals(frames[0]["train_count"]):
            raise ValueError(f"{ds} IF {imb:g}, {loss}: replicate {s}'s per-class training counts differ from "
                             f"replicate {seeds[0]}'s; per-class accuracies cannot be averaged")
    out = frames[0].copy()
    out["accuracy"] = np.mean([f["accuracy"].to_numpy() for f in frames], axis=0)
    return out


def _plot_per_class(results: Path, df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(df["dataset"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], sets, strict=True):
        part = df[df["dataset"] == ds]
        imb = part["imbalance"].max()
        for (loss, setting), g in part[part["imbalance"] == imb].groupby(["loss", "setting"], sort=False):
            pc = _per_class_mean(results, ds, imb, loss, sorted(g["seed"])).sort_values("train_count")
            if len(pc) <= 20:
                ax.plot(pc["train_count"], 100 * pc["accuracy"], marker=".", ls="-", alpha=0.8, label=setting)
                continue
            # Many classes: each class a faint dot, and the mean over log-spaced count bins.
            line = ax.plot([], [], marker="o", ls="-", label=setting + " (bin mean)")[0]
            ax.scatter(pc["train_count"], 100 * pc["accuracy"], s=6, alpha=0.25, color=line.get_color())
            edges = np.unique(np.geomspace(pc["train_count"].min(), pc["train_count"].max() + 1, 8).astype(int))
            bins = pd.cut(pc["train_count"], edges, include_lowest=True, right=False)
            means = pc.groupby(bins, observed=True).agg(n=("train_count", "mean"), acc=("accuracy", "mean"))
            line.set_data(means["n"], 100 * means["acc"])
        ax.set_xscale("log")
        ax.set_xlabel("training images of the class")
        ax.set_ylabel("test accuracy (%), mean over replicates")
        ax.set_title(f"{ds}, imbalance {imb:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _natural_section(results: Path, nat: dict, out: Path, replicates: list[int], sources: str) -> tuple[list[str], list[Path]]:
    """Paper's Table 3 shape: rows = model x loss, columns = dataset top-1 / top-5 error (%),
    mean ± std over replicates (the paper's numbers at 224 px beside them)."""
    rows, layout = [], Layout.at(results)
    for model in nat["models"]:
        tag = model.replace(":", "_")
        for name, spec in nat["losses"].items():
            row = {"model": model, "loss": name, "setting": _loss_label(spec)}
            for ds in nat["datasets"]:
                vals: dict[str, list[float]] = {"top1": [], "top5": []}
                for seed in replicates:
                    path = Path(layout.train("cbloss_natural", dataset=ds, model=tag, loss=name, seed=seed))
                    if not path.exists():
                        raise FileNotFoundError(f"{path} is missing: run that cbloss_natural job first")
                    f = MetricsRecord.read(path).final or {}
                    vals["top1"].append(_pct(f.get("top1_error"), path, "top1_error"))
                    if f.get("top5_error") is not None:
                        vals["top5"].append(_pct(f["top5_error"], path, "top5_error"))
                for k, v in vals.items():
                    st = summarize(v)
                    row.update({f"{ds}_{k}_mean": st.mean, f"{ds}_{k}_std": st.std, f"{ds}_{k}_n": st.n})
            rows.append(row)
    table = pd.DataFrame(rows)
    paper = paper_table("cbloss_large_table3")
    md = table[["model", "setting"]].copy()
    for ds in nat["datasets"]:
        for k in ("top1", "top5"):
            col = f"{ds}_{k}"
            md[col] = [format_mean_std(m, s) for m, s in zip(table[f"{col}_mean"], table[f"{col}_std"], strict=True)]
            if col not in paper.columns:
                continue
            vals = []
            for _, r in table.iterrows():
                key = "cb_focal" if nat["losses"][r["loss"]].get("beta", 0) else "softmax"
                hit = paper[(paper["model"] == r["model"].removeprefix("tv:")) & (paper["loss"] == key) & (paper["input"] == 224)]
                vals.append(float(hit[col].iloc[0]) if len(hit) else np.nan)
            table[f"paper_{col}"] = vals
            md[f"paper {col}"] = vals
    table.to_csv(out / "cbloss_natural_table.csv", index=False)
    lines = ["\n## Class-balanced loss on naturally long-tailed data: top-1 / top-5 error (%)\n",
             "Rows: model x loss (Cui et al. 2019, Table 3 shape); mean ± std over "
             f"{len(replicates)} replicate(s) ({sources}); `paper` columns: the paper's numbers at 224 px.\n", to_markdown(md)]
    return lines, [out / "cbloss_natural_table.csv"]


# Our world's sources play the paper's: rows of the paper's tables beside ours.
PAPER_SOURCE = {"generic": "imagenet", "natural": "inat2017", "generic+natural": "imagenet+inat2017"}
PAPER_SIMILARITY_NETWORK = "Cui et al. 2018: ResNet-101 trained on JFT"


def similarity_network_label(transfer: dict, datasets: dict) -> str:
    """The similarity table's heading: the feature network, and whether it has seen a ranked
    source (the paper's JFT network had not).

    >>> similarity_network_label({"features": {"model": "probe", "networks": {"probe": ["probe"]}},
    ...                           "sources": {"generic": ["generic"]}}, {"probe": {"kind": "world"}})
    'feature network `probe`: trained on world classes disjoint from every source and target'
    """
    feats, sources = transfer.get("features", {}), transfer.get("sources", {})
    model, networks = feats.get("model", ""), feats.get("networks", {})
    if model in networks:
        parts = networks[model]
        if all(datasets.get(d, {}).get("kind") == "world" for d in parts):
            return f"feature network `{model}`: trained on world classes disjoint from every source and target"
        return (f"feature network `{model}`: trained on {', '.join(f'`{d}`' for d in parts)}, "
                "datasets that no source pools and no target is")
    if model in sources:
        return f"feature network: the one pretrained on `{model}`, a ranked source, so it has seen that source's classes"
    weights = feats.get("weights")
    size = f", {feats['image_size']} px, {feats.get('crop', 'short_side')} crop {feats.get('crop_fraction', 0.875):g}" \
        if feats.get("image_size") else ""
    if not weights:
        return f"feature network `{model}` with random weights{size}"
    head = f"feature network `{model}` (torchvision `{weights}` weights{size})"
    if "IMAGENET" not in weights.upper() and weights.upper() != "DEFAULT":
        return head
    name = lambda d: datasets.get(d, {}).get("name", d) if datasets.get(d, {}).get("kind") == "registry" else None  # noqa: E731
    seen = [s for s, parts in sources.items() if any(name(d) == "imagenet" for d in parts)]
    sel = transfer.get("selection") or {}
    if seen and set(sel.get("pool", [])) & set(seen):
        seen.append(sel.get("name", "selected"))
    if not seen:
        return f"{head}: trained on ImageNet, which no ranked source here holds"
    return (f"{head}: trained on ImageNet, so this network has seen one of the ranked sources "
            f"({', '.join(f'`{s}`' for s in seen)}); the paper's network (JFT) had seen none")


def transfer_frame(results: Path, sources: list[str], targets: list[str], seeds: list[int]) -> pd.DataFrame:
    """One row per fine-tune run: source, target, replicate (``seed``), top-1 accuracy (%), ECE, run ids."""
    rows, layout = [], Layout.at(results)
    for s in sources:
        for t in targets:
            for seed in seeds:
                path = Path(layout.train("finetune", source=s, target=t, seed=seed))
                if not path.exists():
                    raise FileNotFoundError(f"{path} is missing: run the finetune job for {s} -> {t}, replicate {seed} first")
                m = MetricsRecord.read(path)
                f = m.final or {}
                rows.append({"source": s, "target": t, "seed": int(seed), "top1_acc": _pct(f.get("top1_acc"), path, "top1_acc"),
                             "ece": _pct(f.get("ece"), path, "ece"), "run_id": m.run_id, "parent_run_id": m.parent_run_id,
                             "git_commit": m.git_commit})
    df = pd.DataFrame(rows)
    summarize(df["top1_acc"].tolist())  # a NaN accuracy fails here, before any table is written
    return df


def transfer_table(df: pd.DataFrame, rows: list[str], targets: list[str]) -> pd.DataFrame:
    """Rows = sources, per target: mean, std, n of the top-1 accuracy (%) over replicates;
    ``mean``: the mean over targets of the replicate means."""
    st = _cell_stats(df, ["source", "target"], "top1_acc").set_index(["source", "target"])
    out = []
    for s in rows:
        row = {"source": s}
        for t in targets:
            r = st.loc[(s, t)]
            row.update({f"{t}_mean": r["mean"], f"{t}_std": r["std"], f"{t}_n": int(r["n"])})
        row["mean"] = float(np.mean([row[f"{t}_mean"] for t in targets]))
        out.append(row)
    return pd.DataFrame(out)


def _transfer_markdown(table: pd.DataFrame, targets: list[str]) -> str:
    md = pd.DataFrame({"source": table["source"]})
    for t in targets:
        md[t] = [format_mean_std(m, s, 1) for m, s in zip(table[f"{t}_mean"], table[f"{t}_std"], strict=True)]
    md["mean"] = table["mean"]
    return to_markdown(md, "{:.1f}")


def correlations(x: np.ndarray, y: np.ndarray) -> dict:
    """Spearman's rho and Kendall's tau (with p-values) of paired samples."""
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"correlation of non-finite values ({x.tolist()} vs {y.tolist()}): a NaN similarity or "
                         "accuracy must not become a silent NaN correlation")
    rho = stats.spearmanr(x, y)
    tau = stats.kendalltau(x, y)
    return {"n": int(len(x)), "spearman": float(rho.statistic), "spearman_p": float(rho.pvalue),
            "kendall": float(tau.statistic), "kendall_p": float(tau.pvalue)}


def within_target_kendall(pairs: pd.DataFrame, value: str) -> float | None:
    """Mean over targets of Kendall's τ between similarity and ``value`` across sources."""
    taus = [correlations(g["similarity"].to_numpy(), g[value].to_numpy())["kendall"]
            for _, g in pairs.groupby("target") if len(g) > 2]
    return float(np.nanmean(taus)) if taus and not np.all(np.isnan(taus)) else None


def load_similarity(results: Path, spec: dict, r: int) -> pd.DataFrame:
    """Replicate ``r``'s similarity matrix (sources x targets)."""
    rep = replicates_of(spec)
    names = [*spec["sources"], *spec["transfer"]["targets"]]
    return pd.read_csv(Layout.at(results).similarity(spec["feature_model"], rep=rep.similarity_key(names, r)), index_col=0)


def _with_similarity(df: pd.DataFrame, sims: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """Fine-tune rows of the ranked sources, each with its replicate's similarity."""
    g = df[df["source"].isin(next(iter(sims.values())).index)].copy()
    g["similarity"] = [float(sims[int(r)].loc[s, t]) for s, t, r in zip(g["source"], g["target"], g["seed"], strict=True)]
    bad = g[~np.isfinite(g["similarity"])]
    if len(bad):
        r = bad.iloc[0]
        raise ValueError(f"similarity of {r['source']} -> {r['target']} in replicate {int(r['seed'])} is "
                         f"{r['similarity']}: rerun that replicate's similarity job")
    return g


def similarity_pairs(df: pd.DataFrame, sims: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """Per (source, target) with a similarity: mean and std of the accuracy over replicates,
    the mean similarity over replicates (each replicate's own matrix), the gain over the
    target's mean across sources and over scratch."""
    acc = df.groupby(["source", "target"], sort=False)["top1_acc"].agg(["mean", "std", "count"]).reset_index()
    acc = acc.rename(columns={"mean": "top1_acc_mean", "std": "top1_acc_std", "count": "n"})
    withsim = _with_similarity(df, sims).groupby(["source", "target"], sort=False)["similarity"]
    sim_mean, sim_std = withsim.mean(), withsim.std()
    pairs = acc[acc["source"].isin(next(iter(sims.values())).index)].copy()
    keys = list(zip(pairs["source"], pairs["target"], strict=True))
    pairs["similarity"] = [float(sim_mean.loc[k]) for k in keys]
    pairs["similarity_std"] = [float(sim_std.loc[k]) for k in keys]
    pairs["gain"] = pairs["top1_acc_mean"] - pairs.groupby("target")["top1_acc_mean"].transform("mean")
    scratch = acc[acc["source"] == "scratch"].set_index("target")["top1_acc_mean"]
    if len(scratch):
        pairs["gain_over_scratch"] = pairs["top1_acc_mean"] - pairs["target"].map(scratch)
    return pairs


def similarity_correlation(df: pd.DataFrame, sims: dict[int, pd.DataFrame], pairs: pd.DataFrame) -> dict:
    """Similarity against accuracy: pooled on the replicate means (vs gain and raw), the
    within-target Kendall τ of each replicate (its similarity matrix against its fine-tuned
    accuracies; mean over targets), their mean over replicates with its interval (the
    headline, :func:`similarity_claim`), and the τ on the replicate means."""
    per_rep = {}
    for r, g in _with_similarity(df, sims).groupby("seed"):
        per_rep[int(r)] = within_target_kendall(g, "top1_acc")
    vals = [v for v in per_rep.values() if v is not None]
    spread = summarize(vals) if vals else None
    best = pairs.loc[pairs.groupby("target")["top1_acc_mean"].idxmax()].set_index("target")["source"]
    closest = pairs.loc[pairs.groupby("target")["similarity"].idxmax()].set_index("target")["source"]
    return {
        "vs_gain": correlations(pairs["similarity"].to_numpy(), pairs["gain"].to_numpy()),
        "vs_accuracy": correlations(pairs["similarity"].to_numpy(), pairs["top1_acc_mean"].to_numpy()),
        "within_target_kendall_of_means": within_target_kendall(pairs, "top1_acc_mean"),
        "within_target_kendall_per_replicate": per_rep,
        "within_target_kendall_replicate_mean": spread.mean if spread else None,
        "within_target_kendall_replicate_std": spread.std if spread else None,
        "most_similar_is_best": {t: bool(closest[t] == best[t]) for t in best.index},
    }


def similarity_claim(corr: dict, sources: str) -> tuple[str, Claim | None]:
    """Domain similarity predicts which source transfers best: the within-target Kendall τ of
    each replicate, its mean over replicates with its 95% interval; ``holds`` only when the
    interval lies above 0 (no other threshold)."""
    per_rep = corr["within_target_kendall_per_replicate"]
    taus = [per_rep[r] for r in sorted(per_rep) if per_rep[r] is not None]
    if not taus:
        return "- Similarity vs fine-tune accuracy: too few sources per target to rank.\n", None
    claim = mean_claim("similarity_predicts_transfer", "within-target Kendall tau of domain similarity vs fine-tuned "
                       "accuracy, mean over targets and replicates", taus, sources)
    hits = corr["most_similar_is_best"]
    each = ", ".join(f"{v:.2f}" for v in taus)
    line = _claim_line("Domain similarity predicts which source transfers best", claim,
                       f"Kendall τ per replicate: {each}")
    return (line.rstrip("\n") + f" The most similar source is the best one on {sum(hits.values())} of {len(hits)} "
            "targets (replicate means).\n"), claim


def _plot_similarity_vs_accuracy(pairs: pd.DataFrame, corr: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = dict(zip(sorted(pairs["source"].unique()), "osD^vP*X", strict=False))
    targets = sorted(pairs["target"].unique())
    for t, g in pairs.groupby("target"):
        for _, r in g.iterrows():
            ax.errorbar(r["similarity"], r["gain"], yerr=0 if pd.isna(r["top1_acc_std"]) else r["top1_acc_std"],
                        marker=markers[r["source"]], color=f"C{targets.index(t)}", ms=6, capsize=2,
                        label=t if r["source"] == g["source"].iloc[0] else None)
    for s, m in markers.items():
        ax.scatter([], [], marker=m, color="grey", label=s)
    ax.set_xlabel("domain similarity exp(-γ EMD)")
    ax.set_ylabel("accuracy minus target mean (points; bar: std over replicates)")
    ax.set_title(f"Spearman ρ={corr['spearman']:.2f}, Kendall τ={corr['kendall']:.2f} (n={corr['n']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _paper_transfer_lines(spec: dict) -> list[str]:
    """The paper's transfer table, printed beside ours only when ours ran the paper's recipe on
    the paper's data (Inception-v3 on the real targets); otherwise say why not."""
    tr = spec["transfer"]
    model = tr["finetune"]["recipe"].get("model", "")
    real = all(spec.get("datasets", {}).get(t, {}).get("kind") not in (None, "world") for t in tr["targets"])
    if model == "tv:inception_v3" and real:
        return ["\nThe paper's table (Cui et al. 2018, Inception-v3 at 299 px; rows as named, selected = selected_585):\n",
                to_markdown(paper_table("transfer_table"))]
    why = "generated data" if not real else f"model {model}, not Inception-v3"
    return [f"\nThe paper's transfer numbers are not printed beside these: reduced recipe on {why} — not comparable "
            "(they are in `reference/transfer_table.csv`; in this world "
            + ", ".join(f"{k} plays {v}" for k, v in PAPER_SOURCE.items()) + ").\n"]


def transfer_sources(spec: dict, random_source: bool = False) -> str:
    """The sources of variation of the transfer half's intervals, in words."""
    tr = spec["transfer"]
    data = [d for parts in tr["sources"].values() for d in parts] + list(tr["targets"])
    return covers(spec, "transfer", data, random_source=random_source)


def _transfer_section(results: Path, spec: dict, out: Path) -> tuple[list[str], list[Path], list[str], list[Claim]]:
    tr = spec["transfer"]
    targets, reps = tr["targets"], replicate_ids(spec)
    rows = list(spec["sources"]) + (["scratch"] if tr["finetune"].get("scratch", True) else [])
    over = f"{len(reps)} replicates ({transfer_sources(spec)})"
    df = transfer_frame(results, rows, targets, reps)
    df.to_csv(out / "transfer_cells.csv", index=False)
    table = transfer_table(df, rows, targets)
    table.to_csv(out / "transfer_table.csv", index=False)
    sims = {r: load_similarity(results, spec, r) for r in reps}
    mean_sim = sum(sims.values()) / len(sims)
    layout, rep = Layout.at(results), replicates_of(spec)
    key0 = rep.similarity_key([*spec["sources"], *targets], reps[0])
    heatmap = os.path.relpath(layout.similarity(spec["feature_model"], "heatmap.png", rep=key0),
                              os.path.dirname(layout.report()))

    # Accuracy differs by target far more than by source, so the scatter and the pooled
    # correlation use the accuracy minus the target's mean over sources ("gain").
    pairs = similarity_pairs(df, sims)
    pairs.to_csv(out / "similarity_vs_accuracy.csv", index=False)
    corr = similarity_correlation(df, sims, pairs)
    (out / "transfer_correlation.json").write_text(json.dumps(corr, indent=2) + "\n")
    _plot_similarity_vs_accuracy(pairs, corr["vs_gain"], out / "similarity_vs_accuracy.png")
    sim_line, sim_claim = similarity_claim(corr, transfer_sources(spec))

    means = table.set_index("source").drop(index="scratch", errors="ignore")[[f"{t}_mean" for t in targets]]
    best = {t: means[f"{t}_mean"].idxmax() for t in targets}
    g, r = corr["vs_gain"], corr["vs_accuracy"]
    lines = [
        "## Transfer: fine-tune top-1 accuracy (%)\n",
        f"Rows: pretraining source (`scratch` = random weights), columns: targets (Cui et al. 2018 table shape); "
        f"mean ± std over {over}; fine-tune replicate R starts from the source's network of replicate R."
        + (" Fine-tuning here is a **linear probe**: the source network frozen, a new head trained on the target."
           if tr["finetune"]["recipe"].get("linear_probe") else "") + "\n",
        _transfer_markdown(table, targets),
        "\nBest source per target (replicate mean): " + ", ".join(f"{t}: **{s}**" for t, s in best.items()) + "\n",
        *_paper_transfer_lines(spec),
        f"\n## Domain similarity ({similarity_network_label(tr, spec.get('datasets', {}))})\n",
        f"Mean over the {len(reps)} replicates' matrices (each replicate's in its own "
        f"`{Path(layout.similarity(spec['feature_model'], rep=key0)).parent.parent.relative_to(results)}/rep<k>/`):\n",
        to_markdown(mean_sim.reset_index().rename(columns={"index": "source"}), "{:.3f}"),
        f"\nThe paper's ({PAPER_SIMILARITY_NETWORK}; real data, not comparable with a generated world):\n",
        to_markdown(paper_table("domain_similarity"), "{:.3f}"),
        f"\n![similarity, replicate {reps[0]}]({heatmap})\n",
        "\n## Similarity vs fine-tune accuracy\n",
        sim_line,
        f"\nPooled over {g['n']} (source, target) pairs, mean similarity vs replicate-mean accuracy relative to the "
        f"target's mean: Spearman ρ = {g['spearman']:.3f} (p = {g['spearman_p']:.3g}), Kendall τ = {g['kendall']:.3f} "
        f"(p = {g['kendall_p']:.3g}). Raw accuracy: Spearman ρ = {r['spearman']:.3f}, Kendall τ = {r['kendall']:.3f}.\n",
        "\n![similarity vs accuracy](similarity_vs_accuracy.png)\n",
    ]
    sel = spec.get("selected")
    if sel:
        from .transfer_eval import selection_sizes

        sizes = selection_sizes(results, spec, sel)
        classes = sorted({c for c, _ in sizes})
        lines.append(f"\nSelected source `{sel}`: {classes[0] if len(classes) == 1 else f'{classes[0]}–{classes[-1]}'} classes "
                     f"over the replicates (greedy, union over targets; each replicate's list with scores in "
                     f"`{Path(layout.selection(sel, rep=0)).parent.parent.relative_to(results)}/rep<k>/classes.csv`).\n")
    files = [out / n for n in ("transfer_cells.csv", "transfer_table.csv", "transfer_correlation.json",
                               "similarity_vs_accuracy.csv", "similarity_vs_accuracy.png")]
    from .transfer_eval import transferability_section

    more, more_files, more_claims, more_rows = transferability_section(results, spec, out, df)
    return (lines + more, files + more_files, [sim_line, *more_claims],
            ([sim_claim] if sim_claim else []) + more_rows)


def data_lines(spec: dict) -> list[str]:
    """Where each dataset of the study came from."""
    world = spec.get("world") or {}
    lines = ["## Data\n"]
    for name, d in (spec.get("datasets") or {}).items():
        kind = d.get("kind")
        if kind == "world":
            seeds = sorted({replicates_of(spec).seed("world", world.get("seed", 0), k)
                            for k in (replicates_of(spec).dataset_key(name, r) for r in replicate_ids(spec))})
            where = (f"generated world (`finetail.world`, world seed{'s' if len(seeds) > 1 else ''} "
                     f"{', '.join(map(str, seeds))}, {world.get('image_size', '?')} px)")
        elif kind == "registry":
            where = f"downloaded `{d.get('name', name)}` (finetail dataset registry), checksums verified"
        else:
            where = f"ImageFolder from `{d.get('source')}`"
        about = f" — {d['about']}" if d.get("about") else ""
        lines.append(f"- `{name}`: {where}{about}\n")
    return lines


def _cbloss_section(results: Path, spec: dict, out: Path,
                    paper_ok: dict[str, bool]) -> tuple[list[str], list[Path], list[str], list[Claim]]:
    cb = spec["cbloss"]
    reps = replicate_ids(spec)
    sources = {ds: covers(spec, "cbloss", [ds]) for ds in cb["datasets"]}
    over = f"{len(reps)} replicates ({'; '.join(f'{d}: {w}' for d, w in sources.items())})"
    df = cbloss_frame(results, cb, reps)
    df.to_csv(out / "cbloss_cells.csv", index=False)
    table = cbloss_table(df, cb, paper_ok)
    table.to_csv(out / "cbloss_table.csv", index=False)
    md = cbloss_table_markdown(table)
    (out / "cbloss_table.md").write_text(md)
    shots = shots_table(df)
    shots.to_csv(out / "cbloss_shots.csv", index=False)
    shots_md = _shots_markdown(shots)
    (out / "cbloss_shots.md").write_text(shots_md)
    base = baseline_loss(cb)
    paired = paired_table(df, base) if base else pd.DataFrame(columns=PAIRED_COLUMNS)
    paired.to_csv(out / "cbloss_paired.csv", index=False)
    methods = methods_table(shots, cb, followups_comparable(spec, results), cells=df)
    methods.to_csv(out / "cbloss_methods.csv", index=False)
    _plot_error_vs_if(df, out / "cbloss_error_vs_if.png")
    _plot_per_class(results, df[~df["loss"].str.contains("+", regex=False)], out / "cbloss_per_class.png")
    _plot_few_vs_many(methods, out / "cbloss_few_vs_many.png")
    files = [out / n for n in ("cbloss_cells.csv", "cbloss_table.csv", "cbloss_table.md", "cbloss_shots.csv",
                               "cbloss_shots.md", "cbloss_paired.csv", "cbloss_methods.csv", "cbloss_error_vs_if.png",
                               "cbloss_per_class.png", "cbloss_few_vs_many.png")]
    claims, rows = cb_claims(df, cb, base, sources)
    if base:
        for ds in cb["datasets"]:
            rows += comparison_claims(df[df["dataset"] == ds], base, sources[ds])
    pm = paired.copy()
    if len(pm):
        pm["95% CI"] = [f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in zip(pm["ci_low"], pm["ci_high"], strict=True)]
        pm["P(better)"] = [f"{p:.2f} [{lo:.2f}, {hi:.2f}]" for p, lo, hi in
                           zip(pm["p_improve"], pm["p_improve_low"], pm["p_improve_high"], strict=True)]
        pm = pm[["dataset", "imbalance", "setting", "metric", "difference", "95% CI", "P(better)", "n", "verdict"]]
        pm["imbalance"] = [f"{v:g}" for v in pm["imbalance"]]
    lines = [
        "## Class-balanced loss: top-1 error (%)\n",
        f"Rows: loss settings; columns: imbalance factor (Cui et al. 2019, Table 2 shape); mean ± std over "
        f"{over}. "
        f"`{BEST_CB_LABEL}`: per column the class-balanced setting with the lowest mean error, in [brackets] — "
        "chosen on the test set, as the paper chose its best setting.\n",
        _paper_note(paper_ok, spec, results),
        md,
        "\n## Long-tail methods side by side (%)\n",
        "The class-balanced losses beside the later methods (LDAM-DRW, balanced softmax, logit adjustment; "
        "post-hoc corrections of a trained cell, `+`, no retraining; README: \"Long-tail methods\"), on the same "
        "subsets, replicates and recipe; mean ± std over replicates. Published numbers "
        "(`reference/longtail_followups.csv`) stand beside a row only where the data is the real CIFAR and the "
        "row's recipe is the one that made the number (schedule, batch, augmentation, input normalisation, "
        "checkpoint rule and the method's parameters, `finetail.published`); otherwise the cell names the first "
        "field that differs. A published number chosen on the test set stands beside our best evaluation, also "
        "chosen on the test set (its row says so)"
        + ("." if methods["published_error"].notna().any() else ". None is printed here.")
        + _followups_data_note(spec, results) + "\n",
        methods_markdown(methods),
        "\n![few-shot vs many-shot accuracy](cbloss_few_vs_many.png)\n",
        "\n## Many / medium / few-shot accuracy and calibration (%)\n",
        "Mean ± std over replicates; `ece`: expected calibration error, 15 bins.\n",
        shots_md,
        f"\n## Paired over replicates: each loss minus `{base}`\n",
        f"Difference of the means in points, with its 95% confidence interval (Student's t over the paired "
        f"replicates: {over}); `better`/`worse` only when the interval excludes 0, else `not clear`; "
        "P(better): the share of replicates in which the loss beats the baseline, with its bootstrap interval.\n",
        to_markdown(pm) if len(pm) else "No baseline (an unweighted softmax loss) in the grid.\n",
        "\n![error vs imbalance](cbloss_error_vs_if.png)\n\n![per-class accuracy](cbloss_per_class.png)\n",
    ]
    return lines, files, claims, rows


def _paper_note(paper_ok: dict[str, bool], spec: dict, results: Path | None = None) -> str:
    shown = [d for d, ok in paper_ok.items() if ok]
    if shown:
        return (f"`paper` columns ({', '.join(shown)}): Cui et al. 2019 Table 2, beside the rows whose setting is the "
                "paper's (an unweighted loss; for CB, our best-CB row and the exact (loss, β, γ) behind the paper's best "
                "in that column).\n")
    why = paper_reasons(spec, results)
    return f"Paper columns: {why}\n"


def _data_reasons(spec: dict, results: Path | None) -> dict[str, str | None]:
    """Per cbloss dataset: None if it is the real CIFAR (:func:`finetail.published.cifar_data_reason`), else why not."""
    return {d: published.cifar_data_reason(spec, d, results) for d in (spec.get("cbloss") or {}).get("datasets", [])}


def _followups_data_note(spec: dict, results: Path | None) -> str:
    why = [w for w in _data_reasons(spec, results).values() if w]
    return f" No published number here: {'; '.join(why)}." if why else ""


def paper_reasons(spec: dict, results: Path | None = None) -> str:
    """Why the paper's Table 2 columns are or are not printed, in one line."""
    cb = spec["cbloss"]
    if not PAPER_CIFAR & set(cb["datasets"]):
        return "none — these are not the paper's datasets (CIFAR-10/100-LT), so its numbers are not comparable."
    why = [w for w in _data_reasons(spec, results).values() if w]
    if len(why) == len(cb["datasets"]):
        return "none — not the paper's data: " + "; ".join(why) + "."
    match = paper_recipe(cb["recipe"])
    if match.is_paper:
        return "the paper's recipe on CIFAR; see the columns."
    return "reduced recipe: not comparable (" + match.reason() + ")."


def followups_comparable(spec: dict, results: Path | None = None) -> dict[str, bool]:
    """Per cbloss dataset: whether the later long-tail papers' published numbers may stand
    beside ours as far as the data goes (the real CIFAR: a registry dataset with the official
    archive, :func:`finetail.published.cifar_data_reason`). Each number's recipe is then
    compared row by row (:func:`methods_table`)."""
    return {d: why is None for d, why in _data_reasons(spec, results).items()}


def paper_comparable(spec: dict, results: Path | None = None) -> dict[str, bool]:
    """Per cbloss dataset: whether the paper's Table 2 numbers may stand beside ours: the real
    CIFAR (kind and archive digest, not the name: a world dataset named ``cifar10`` is not),
    trained with the paper's recipe."""
    cb = spec.get("cbloss") or {}
    same = paper_recipe(cb.get("recipe", {})).is_paper
    return {d: same and d in PAPER_CIFAR and why is None for d, why in _data_reasons(spec, results).items()}


def build_report(results: Path, spec: dict, out: Path) -> list[Path]:
    """Write the report files under ``out`` and return their paths (summary.md last)."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    body: list[str] = []
    claims: list[str] = []
    rows: list[Claim] = []
    reps = replicate_ids(spec)
    if spec.get("cbloss"):
        lines, files, found, found_rows = _cbloss_section(results, spec, out, paper_comparable(spec, results))
        body, written, claims, rows = body + lines, written + files, claims + found, rows + found_rows
    if spec.get("cbloss_natural"):
        nat = spec["cbloss_natural"]
        lines, files = _natural_section(results, nat, out, reps, covers(spec, "cbloss", nat["datasets"]))
        body, written = body + lines, written + files
    if spec.get("transfer"):
        lines, files, found, found_rows = _transfer_section(results, spec, out)
        body, written, claims, rows = body + lines, written + files, claims + found, rows + found_rows
    written.append(write_claims(rows, out / "claims.csv"))
    sections = [f"# finetail report: study `{spec.get('study', results.name)}`\n"]
    if claims:
        sections += [f"## The papers' claims, checked over {len(reps)} replicates\n",
                     "Each claim: its verdict, the effect with its 95% interval over replicates (`not clear` whenever "
                     "the interval includes 0), in how many replicates it holds, the probability of improvement "
                     "P(better) over replicates, and the sources of variation the interval covers. Every comparison "
                     "is in `claims.csv`; `finetail compare-claims` checks a rerun against it.\n",
                     *claims, ""]
    sections += [*body, *data_lines(spec)]
    summary = out / "summary.md"
    atomic_write(summary, lambda tmp: tmp.write_text("\n".join(sections)))
    written.append(summary)
    return written
