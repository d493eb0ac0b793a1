"""The results layout: every path under ``results/<study>/`` and ``logs/<study>/``.

The rules (``workflow/rules/*.smk``), the report and lineage/audit all build their paths
here, so renaming a folder is a change to this module alone. Paths are strings joined with
``/`` (Snakemake wants strings, and a wildcard such as ``"{dataset}"`` passes through
unchanged); Python callers wrap them in :class:`pathlib.Path`.

::

    results/<study>/
      datasets/<name>/          manifest.parquet, classes.csv, source.json (a real dataset)
      datasets/<name>/rep<k>/   the same + images.npy (a generated dataset, per world)
      longtail/<dataset>_if<IF>/rep<k>/  manifest.parquet, counts.csv
      cbloss/<dataset>/if<IF>/<loss>/seed<R>/           one training job's results:
      cbloss_natural/<dataset>/<model>/<loss>/seed<R>/  metrics.json, per_class.csv,
      pretrain/<source>/seed<R>/                        history.csv (cbloss, pretrain:
      finetune/<source>/<target>/seed<R>/               model.pt)
      posthoc/<dataset>/if<IF>/<loss>/<method>/seed<R>/ a post-hoc correction of a cbloss
                                                        cell: metrics.json, per_class.csv
      checkpoints/<training folder>/  last.pt, run.json
      sources/<source>/rep<k>/  manifest.parquet, classes.csv (pooled datasets)
      features/<model>/rep<k>/<dataset>.npz
      similarity/<model>/rep<k>/  matrix.csv, emd.csv, heatmap.png
      selection/<name>/rep<k>/classes.csv   (the greedy selection; its random counterpart likewise)
      transferability/<source>/<target>/rep<R>/scores.csv   LogME, LEEP, NCE, H-score, k-NN
      report/                   summary.md, tables, claims.csv, figures
      mlflow.db, mlartifacts/   the default tracking store
    logs/<study>/<rule>/<wildcards...>.log

``seed<R>`` is replicate ``R`` (finetail.replicates): its training seed is R when training
varies between replicates. ``rep<k>`` is the replicate key of a seeded stage's output: the
replicate when the stage (or anything upstream) varies, 0 when it is fixed and shared.

Imports nothing beyond the standard library.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TRAINING", "Layout", "imbalance_tag", "parse_train_dir", "split_replicate"]

# One training job's result folder, per training rule, as a pattern over the rule's wildcards.
# Every training job runs once per replicate (``replicates.count``), the last part: seed<R>.
TRAINING: dict[str, str] = {
    "cbloss": "cbloss/{dataset}/if{imbalance}/{loss}/seed{seed}",
    "cbloss_natural": "cbloss_natural/{dataset}/{model}/{loss}/seed{seed}",
    "pretrain": "pretrain/{source}/seed{seed}",
    "finetune": "finetune/{source}/{target}/seed{seed}",
    # not training: a post-hoc correction of a trained cbloss cell (finetail.posthoc), one job
    # and one run each too, with the same metrics.json
    "posthoc": "posthoc/{dataset}/if{imbalance}/{loss}/{method}/seed{seed}",
}

_DATASETS = "datasets"
_LONGTAIL = "longtail"
_SOURCES = "sources"
_FEATURES = "features"
_SIMILARITY = "similarity"
_SELECTION = "selection"
_TRANSFERABILITY = "transferability"
_CHECKPOINTS = "checkpoints"
_REPORT = "report"
_MLFLOW_DB = "mlflow.db"
_ARTIFACTS = "mlartifacts"


def imbalance_tag(imbalance: float | str) -> str:
    """Imbalance factor as used in paths: 100 -> "100", 12.5 -> "12.5" (a string passes)."""
    return imbalance if isinstance(imbalance, str) else f"{imbalance:g}"


_REP = "rep"


def _rep(rep: int | str | None) -> list[str]:
    """The replicate part of a path (``rep<k>``), or none for data stored once (a real dataset)."""
    return [] if rep is None else [f"{_REP}{rep}"]


def split_replicate(folder: str | os.PathLike) -> tuple[Path, int | None]:
    """A stage's output folder without its replicate part, and the replicate key (None when
    the folder has none): ``datasets/gen10/rep2`` -> (``datasets/gen10``, 2).

    >>> split_replicate("results/s/datasets/gen10/rep2")
    (PosixPath('results/s/datasets/gen10'), 2)
    >>> split_replicate("results/s/datasets/cifar10")
    (PosixPath('results/s/datasets/cifar10'), None)
    """
    p = Path(folder)
    m = re.fullmatch(rf"{_REP}(\d+)", p.name)
    return (p.parent, int(m.group(1))) if m else (p, None)


def _folder(rule: str, wildcards: dict) -> str:
    """A training rule's folder pattern filled in (an imbalance factor as its path tag)."""
    return TRAINING[rule].format(**{k: imbalance_tag(v) if k == "imbalance" else v for k, v in wildcards.items()})


def _pattern_regex(pattern: str) -> re.Pattern:
    """A TRAINING pattern as a regex over a path's last parts, one named group per wildcard."""
    out = ""
    for literal, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", pattern):
        out += re.escape(literal) + (f"(?P<{name}>[^/]+)" if name else "")
    return re.compile(out)


@dataclass(frozen=True)
class Layout:
    """Paths of one study. ``root`` is ``results/<study>``, ``logs`` is ``logs/<study>``."""

    root: str
    logs: str = ""

    @classmethod
    def of_study(cls, study: str, base: str | os.PathLike = "") -> Layout:
        """The layout of study ``study`` under ``base`` (default: relative paths, as Snakemake uses)."""
        b = os.fspath(base)
        join = (lambda *p: "/".join([b.rstrip("/"), *p])) if b else (lambda *p: "/".join(p))
        return cls(root=join("results", study), logs=join("logs", study))

    @classmethod
    def at(cls, root: str | os.PathLike) -> Layout:
        """The layout of an existing results folder ``root`` (``results/<study>``)."""
        r = Path(root)
        return cls(root=os.fspath(root), logs=os.fspath(r.parents[1] / "logs" / r.name) if len(r.parents) > 1 else "")

    def _p(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- datasets and long-tailed subsets
    def dataset_dir(self, name: str, rep: int | str | None = None) -> str:
        """A dataset's folder; a generated (seeded) dataset's has one per replicate key ``rep``."""
        return self._p(_DATASETS, name, *_rep(rep))

    def dataset(self, name: str, file: str = "manifest.parquet", rep: int | str | None = None) -> str:
        return f"{self.dataset_dir(name, rep)}/{file}"

    def longtail_dir(self, dataset: str, imbalance: float | str, rep: int | str | None = None) -> str:
        return self._p(_LONGTAIL, f"{dataset}_if{imbalance_tag(imbalance)}", *_rep(rep))

    def longtail(self, dataset: str, imbalance: float | str, file: str = "manifest.parquet",
                 rep: int | str | None = None) -> str:
        return f"{self.longtail_dir(dataset, imbalance, rep)}/{file}"

    # -- training jobs
    def train_dir(self, rule: str, **wildcards: str) -> str:
        """A training job's result folder: ``train_dir("finetune", source="natural", target="cub200", seed=0)``."""
        return self._p(_folder(rule, wildcards))

    def train(self, rule: str, file: str = "metrics.json", **wildcards: str) -> str:
        return f"{self.train_dir(rule, **wildcards)}/{file}"

    def train_glob(self, rule: str, file: str = "metrics.json") -> str:
        """A glob pattern matching ``file`` in every result folder of ``rule`` (each wildcard ``*``)."""
        return self.train(rule, file, **dict.fromkeys(re.findall(r"\{(\w+)\}", TRAINING[rule]), "*"))

    def checkpoint_glob(self, rule: str, file: str = "run.json") -> str:
        """A glob pattern matching ``file`` in every checkpoint folder of ``rule``."""
        return self.checkpoint(rule, file, **dict.fromkeys(re.findall(r"\{(\w+)\}", TRAINING[rule]), "*"))

    def checkpoint(self, rule: str, file: str = "last.pt", **wildcards: str) -> str:
        """Where a training job keeps its resume point (``last.pt``) and run record (``run.json``)."""
        return self._p(_CHECKPOINTS, _folder(rule, wildcards), file)

    def train_log(self, rule: str, **wildcards: str) -> str:
        """A training job's log: ``logs/<study>/<its result folder's pattern>.log``."""
        return f"{self.logs}/{_folder(rule, wildcards)}.log"

    def cell(self, cell: str) -> str:
        """A report cell ``"<rule>:<wildcard>:..."`` (wildcards in the rule's folder order, the seed
        last) as its result folder: ``"cbloss:gen10:10:cb_focal:0"`` (or ``if10``, ``seed0``) ->
        ``.../cbloss/gen10/if10/cb_focal/seed0``."""
        rule, *parts = cell.split(":")
        if rule not in TRAINING:
            raise ValueError(f"{cell!r}: {rule!r} is not a training rule; expected one of {sorted(TRAINING)}")
        names = re.findall(r"\{(\w+)\}", TRAINING[rule])
        if len(parts) != len(names):
            raise ValueError(f"{cell!r}: rule {rule} takes {len(names)} part(s) ({', '.join(names)}), not {len(parts)}")
        wc = dict(zip(names, parts, strict=True))
        for name, prefix in (("imbalance", "if"), ("seed", "seed")):
            if name in wc and wc[name].startswith(prefix):
                wc[name] = wc[name][len(prefix):]
        return self.train_dir(rule, **wc)

    # -- transfer half
    def source_dir(self, name: str, rep: int | str | None = None) -> str:
        return self._p(_SOURCES, name, *_rep(rep))

    def source(self, name: str, file: str = "manifest.parquet", rep: int | str | None = None) -> str:
        return f"{self.source_dir(name, rep)}/{file}"

    def features_dir(self, model: str, rep: int | str | None = None) -> str:
        return self._p(_FEATURES, model, *_rep(rep))

    def features(self, model: str, dataset: str, rep: int | str | None = None) -> str:
        return f"{self.features_dir(model, rep)}/{dataset}.npz"

    def similarity(self, model: str, file: str = "matrix.csv", rep: int | str | None = None) -> str:
        return self._p(_SIMILARITY, model, *_rep(rep), file)

    def selection(self, name: str, rep: int | str | None = None) -> str:
        return self._p(_SELECTION, name, *_rep(rep), "classes.csv")

    def scores(self, source: str, target: str, rep: int | str | None = None) -> str:
        """Transferability scores of a source's network of replicate ``rep`` on a target (finetail.scoring)."""
        return self._p(_TRANSFERABILITY, source, target, *_rep(rep), "scores.csv")

    # -- report, tracking store, logs
    def report(self, file: str = "summary.md") -> str:
        return self._p(_REPORT, file)

    def mlflow_db(self) -> str:
        return self._p(_MLFLOW_DB)

    def artifacts(self) -> str:
        return self._p(_ARTIFACTS)

    def base(self) -> str:
        """The folder the study runs in (the parent of ``results/``): recorded relative paths
        (``results/<study>/...``) start there."""
        return os.fspath(Path(self.root).parents[1])

    def log(self, rule: str, *parts: str) -> str:
        """``logs/<study>/<rule>/<parts...>.log``."""
        return "/".join([self.logs, rule, *parts]) + ".log"

    # -- reading paths back
    def stage_of(self, path: str | os.PathLike) -> str | None:
        """The first folder under the root that ``path`` lies in (``datasets``, ``longtail``, ...)."""
        try:
            return Path(path).resolve().relative_to(Path(self.root).resolve()).parts[0]
        except (ValueError, IndexError):
            return None


def parse_train_dir(path: str | os.PathLike) -> tuple[Path, str, dict[str, str]] | None:
    """``(results root, rule, wildcards)`` of a training job's result folder (or a file in
    it), read against :data:`TRAINING`; None when ``path`` is not shaped like one.

    >>> parse_train_dir("results/default/finetune/natural/cub200/seed1/metrics.json")[1:]
    ('finetune', {'source': 'natural', 'target': 'cub200', 'seed': '1'})
    """
    p = Path(path)
    if p.suffix:
        p = p.parent
    parts = p.parts
    for rule, pattern in TRAINING.items():
        depth = pattern.count("/") + 1
        if len(parts) <= depth:
            continue
        m = _pattern_regex(pattern).fullmatch("/".join(parts[-depth:]))
        if m:
            return Path(*parts[:-depth]), rule, m.groupdict()
    return None
