"""Published numbers beside the recipe that made them.

Each published top-1 error of ``reference/longtail_followups.csv`` names, in its ``recipe``
column, the recipe it came from (:data:`PUBLISHED_RECIPES`): the training schedule, batch,
augmentation, input normalisation, which checkpoint was evaluated (the last epoch, or the best
epoch chosen on the test set) and the method's parameters, each read from that number's
official code or README. The report prints a published number only beside a row of ours whose
recipe, seen through the same fields (:func:`our_fields`), is the same; otherwise the row says
which field differs (:func:`compare`, e.g. ``"paper: epochs 1241 vs ours 200"``).

Where a published number was chosen on the test set (LDAM-DRW's ``best_acc1``, BagofTricks-LT's
``best_model.pth``), the report adds our best-on-test value (:func:`best_on_test`, from each
run's ``history.csv``), labelled as chosen on the test set, and puts the number beside it.

The data must be the real CIFAR too: :func:`cifar_data_reason` accepts a dataset only if it is
the registry's CIFAR-10/100 (downloaded or placed by hand, checked against the published md5)
and, where the prepared data's ``source.json`` is at hand, its archive's sha256 is the
official one.

This module reads result files and config only; it imports neither torch nor mlflow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from .training.recipe import LONGTAIL_CIFAR_RECIPE, TrainConfig, show_value

__all__ = [
    "BEST",
    "BEST_SUFFIX",
    "CIFAR_ARCHIVES",
    "FIELDS",
    "LAST",
    "PUBLISHED_RECIPES",
    "Pairing",
    "best_label",
    "best_on_test",
    "best_rows",
    "cifar_data_reason",
    "compare",
    "followup_method",
    "our_fields",
    "pair",
    "wanted_best",
    "with_published",
]

# The official archives of the CIFAR registry entries (finetail.datasets.registry): file name and
# sha256 (as Keras' cifar10/cifar100.load_data pin them; the registry checks the published md5,
# c58f30108f718f92721af3b95e74349a and eb9058c3a382ffc7106e4002c42a8d85, at download).
CIFAR_ARCHIVES: dict[str, tuple[str, str]] = {
    "cifar10": ("cifar-10-python.tar.gz", "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
    "cifar100": ("cifar-100-python.tar.gz", "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"),
}

LAST = "last epoch"
BEST = "best on test"  # the checkpoint with the lowest test error among the evaluated epochs
BEST_SUFFIX = "@best"  # loss of a best-on-test row: "<loss>@best"
CROP_FLIP = "pad-4 crop + flip"

# The recipe fields compared, in the order a difference is named (a row prints the first one
# that differs): the schedule, augmentation and normalisation, the method's parameters, the
# network and the remaining TrainConfig keys, and last the checkpoint rule.
TRAIN_FIELDS = ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "warmup_epochs", "milestones",
                "lr_factors", "model", "width", "weights", "shortcut", "init", "budget_images", "linear_probe", "amp",
                "sampler", "holdout")
METHOD_FIELDS = ("max_margin", "scale", "drw_epoch", "beta", "tau", "head bias", "cRT epochs", "cRT batch_size",
                 "cRT lr", "cRT weight_decay", "cRT warmup_epochs", "cRT milestones", "cRT lr_factors", "cRT sampler")
FIELDS = (*TRAIN_FIELDS[:9], "augmentation", "input_norm", *METHOD_FIELDS, *TRAIN_FIELDS[9:], "checkpoint")

# The later papers' CIFAR-LT recipe in PyTorch (Cao et al.'s cifar_train.py): ResNet-32 with
# option-A shortcuts, 200 epochs of batch 128, SGD 0.9, weight decay 2e-4, lr 0.1, 5 warm-up
# epochs, x0.01 at 160 and x0.0001 at 180, pad-4 crop + flip, inputs standardised per channel.
# Differences these fields do not see are in the README ("Differences from the papers' recipes").
_CAO = {**{k: LONGTAIL_CIFAR_RECIPE[k] for k in TRAIN_FIELDS}, "input_norm": "dataset", "augmentation": CROP_FLIP}

# Menon et al.'s logit_adjustment (google-research, utils.py, main.py, models.py): a Keras
# ResNet-32 of 1x1-3x3-1x1 blocks with projection shortcuts, Nesterov SGD, L2 1e-4 on the loss
# (= weight decay 2e-4), x/255 - 0.5 inputs, per-dataset schedules, the last epoch's test accuracy.
_MENON = {**_CAO, "model": "resnet32 (Keras, 1x1-3x3-1x1 blocks)", "shortcut": "1x1 convolution", "nesterov": True,
          "input_norm": "x/255 - 0.5", "lr_factors": [0.1, 0.01, 0.001], "tau": 1.0, "checkpoint": LAST}

# BagofTricks-LT's CIFAR configs (configs/cao_cifar/...): Cao et al.'s schedule, the test split as
# validation every epoch, and the best checkpoint on it (TEST.MODEL_FILE best_model.pth).
_BOT = {**_CAO, "checkpoint": BEST}

PUBLISHED_RECIPES: dict[str, dict[str, Any]] = {
    # kaidic/LDAM-DRW cifar_train.py: best_acc1 over a test evaluation after every epoch.
    "cao_ldam_drw": {**_CAO, "max_margin": 0.5, "scale": 30.0, "drw_epoch": 160, "beta": 0.9999, "checkpoint": BEST},
    "menon_la_cifar10": {**_MENON, "epochs": 1241, "warmup_epochs": 20, "milestones": [604, 926, 1128]},
    "menon_la_cifar100": {**_MENON, "epochs": 1419, "warmup_epochs": 22, "milestones": [691, 1059, 1290]},
    # The BALMS README's CIFAR-LT rerun: batch 512 for 13k iterations (about 594 and 700 epochs of
    # the IF-200 subsets), AutoAugment and Cutout; the rest of its recipe is not recorded here
    # (a field left out is not compared).
    "balms_cifar10_if200": {"epochs": "13k iterations (~594)", "batch_size": 512,
                            "augmentation": CROP_FLIP + " + AutoAugment + Cutout"},
    "balms_cifar100_if200": {"epochs": "13k iterations (~700)", "batch_size": 512,
                             "augmentation": CROP_FLIP + " + AutoAugment + Cutout"},
    "bot_balanced_softmax": dict(_BOT),
    # tau_norm/cifar*_im100.yaml: tau 1 on the baseline's best_model.pth, keeping the bias.
    "bot_tau_norm": {**_BOT, "tau": 1.0, "head bias": "kept"},
    # cRT/cifar*_im100.yaml: the baseline's epoch_200.pth, a new head with bias, class-balanced
    # sampling, 30 epochs of batch 128, lr 0.1, 5 warm-up epochs, x0.1 at 10 and 20, weight decay
    # 5e-4; the best of its epochs on the test split.
    "bot_crt": {**_BOT, "cRT epochs": 30, "cRT batch_size": 128, "cRT lr": 0.1, "cRT weight_decay": 5e-4,
                "cRT warmup_epochs": 5.0, "cRT milestones": [10, 20], "cRT lr_factors": [0.1, 0.01],
                "cRT sampler": "class_balanced", "head bias": "kept"},
}


class Pairing(NamedTuple):
    """A published number for one of our rows: ``error`` (NaN where not printed), its
    ``source``, ``note`` (why not printed: ``"paper: <field> <theirs> vs ours <ours>"``; None
    when printed or when there is no published number) and ``wants_best``: the recipe is the
    paper's but for the checkpoint rule, so a best-on-test row of ours gets the number."""

    error: float
    source: str | None
    note: str | None
    wants_best: bool


NONE = Pairing(math.nan, None, None, False)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        return (isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b)
                and all(map(_same, a, b)))
    numeric = (int, float)
    if isinstance(a, numeric) and isinstance(b, numeric) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b and type(a) is type(b)


def compare(published: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """Every field where ``ours`` is not the ``published`` recipe, in :data:`FIELDS` order, as
    ``"<field> <published> vs ours <ours>"``. A field the published recipe leaves out (not
    recorded) is not compared; one it has and ours lacks shows ours as ``—``.

    >>> compare({"epochs": 1241, "lr": 0.1}, {"epochs": 200, "lr": 0.1})
    ['epochs 1241 vs ours 200']
    """
    out = []
    for f in FIELDS:
        if f not in published:
            continue
        theirs = published[f]
        if f not in ours:
            out.append(f"{f} {show_value(theirs)} vs ours —")
        elif not _same(theirs, ours[f]):
            out.append(f"{f} {show_value(theirs)} vs ours {show_value(ours[f])}")
    return out


def _augmentation(r: Mapping[str, Any]) -> str:
    parts = [f"pad-{r['crop_pad']} crop"] if r.get("crop_pad") else []
    parts += ["flip"] if r.get("flip") else []
    return " + ".join(parts) or "none"


def our_fields(cb: Mapping[str, Any], loss: str, checkpoint: str = LAST) -> dict[str, Any] | None:
    """The :data:`FIELDS` of our row ``loss`` (``<base>`` or ``<base>+<posthoc name>``) of the
    long-tail grid ``cb``: the grid's recipe (unset keys at :class:`TrainConfig`'s defaults, as
    the schema fills them), its augmentation, the method's parameters and ``checkpoint``
    (``"last epoch"`` or ``"best on test"``). None for a loss the grid does not have."""
    base, _, ph = loss.partition("+")
    spec = (cb.get("losses") or {}).get(base)
    if spec is None:
        return None
    r = {**asdict(TrainConfig()), **(cb.get("recipe") or {})}
    out: dict[str, Any] = {k: r[k] for k in TRAIN_FIELDS}
    out.update(input_norm=r["input_norm"], augmentation=_augmentation(r), checkpoint=checkpoint)
    kind = spec["type"]
    if kind == "ldam":
        out.update(max_margin=float(spec.get("max_margin", 0.5)), scale=float(spec.get("scale", 30.0)))
    if spec.get("drw_epoch") is not None:
        out.update(drw_epoch=spec["drw_epoch"], beta=float(spec.get("beta", 0.9999)))
    if kind == "logit_adjusted":
        out["tau"] = float(spec.get("tau", 1.0))
    if ph:
        how = (cb.get("posthoc") or {}).get(ph)
        if how is None:
            return None
        if how["method"] == "crt":
            c = {**r, **(how.get("recipe") or {})}
            out.update({f"cRT {k}": c[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
                                                   "milestones", "lr_factors")})
            out.update({"cRT sampler": "class_balanced", "head bias": "kept"})
        else:
            out.update({"tau": how.get("tau"), "head bias": "dropped" if how["method"] == "tau_norm" else "kept"})
    return out


def followup_method(loss: str, cb: Mapping[str, Any]) -> str | None:
    """The method of ``reference/longtail_followups.csv`` that our row ``loss`` is an instance
    of, by kind only (its parameters are compared as recipe fields): ``ldam_drw`` (LDAM with
    DRW), ``balanced_softmax``, ``logit_adjustment_loss``, and ``tau_norm`` / ``crt`` of an
    unweighted softmax cell; None otherwise."""
    base, _, ph = loss.partition("+")
    spec = (cb.get("losses") or {}).get(base)
    if spec is None:
        return None
    if ph:
        plain = spec["type"] == "softmax" and not spec.get("beta", 0.0) and spec.get("drw_epoch") is None
        method = ((cb.get("posthoc") or {}).get(ph) or {}).get("method")
        return method if plain and method in ("tau_norm", "crt") else None
    if spec["type"] == "ldam" and spec.get("drw_epoch") is not None:
        return "ldam_drw"
    return {"balanced_softmax": "balanced_softmax", "logit_adjusted": "logit_adjustment_loss"}.get(spec["type"])


def pair(published: pd.DataFrame, ds: str, imb: float, loss: str, cb: Mapping[str, Any],
         checkpoint: str = LAST) -> Pairing:
    """The published number for our row (``dataset``, ``imbalance``, ``loss``) evaluated at
    ``checkpoint``: printed only if every recorded field of its recipe is ours; else NaN with
    the first differing field named (``"paper: epochs 1241 vs ours 200"``, ``"(+2 more)"``
    when more differ). ``published`` is ``reference/longtail_followups.csv``."""
    method = followup_method(loss, cb)
    if method is None:
        return NONE
    hit = published[(published["dataset"] == ds) & (published["imbalance"] == imb) & (published["method"] == method)]
    if not len(hit):
        return NONE
    row = hit.iloc[0]
    recipe = PUBLISHED_RECIPES.get(str(row["recipe"]))
    if recipe is None:
        raise ValueError(f"reference/longtail_followups.csv: {ds} IF {imb:g} {method} names recipe "
                         f"{row['recipe']!r}, which finetail.published.PUBLISHED_RECIPES does not hold")
    ours = our_fields(cb, loss, checkpoint)
    diffs = compare(recipe, ours or {})
    if not diffs:
        return Pairing(float(row["error"]), str(row["source"]), None, False)
    only_checkpoint = len(diffs) == 1 and diffs[0].startswith("checkpoint ")
    more = f" (+{len(diffs) - 1} more)" if len(diffs) > 1 else ""
    return Pairing(math.nan, str(row["source"]), f"paper: {diffs[0]}{more}", only_checkpoint)


def best_on_test(metrics_path: str | Path) -> dict[str, float]:
    """The evaluation with the lowest test top-1 error of one run, from the ``history.csv``
    beside its ``metrics.json``: ``best_top1_error`` and ``best_balanced_acc`` (%, of that
    epoch), ``best_epoch`` (0-based) and ``eval_every`` (epochs between evaluations, from the
    history: 1 means every epoch). NaN for each where the run has no history (a post-hoc
    correction without training) or no evaluation in it.

    This value is chosen on the test set, as LDAM-DRW's ``best_acc1`` and BagofTricks-LT's
    ``best_model.pth`` are: an optimistic estimate, only for comparing with such numbers.
    """
    nan = {"best_top1_error": math.nan, "best_balanced_acc": math.nan, "best_epoch": math.nan, "eval_every": math.nan}
    path = Path(metrics_path).with_name("history.csv")
    if not path.exists():
        return nan
    h = pd.read_csv(path)
    if "test_top1_error" not in h.columns or h["test_top1_error"].isna().all():
        return nan
    ev = h[h["test_top1_error"].notna()]
    best = ev.loc[ev["test_top1_error"].idxmin()]
    epochs = ev["epoch"].to_numpy() if "epoch" in ev.columns else ev.index.to_numpy()
    gaps = [b - a for a, b in zip(epochs[:-1], epochs[1:], strict=True)]
    return {"best_top1_error": 100.0 * float(best["test_top1_error"]),
            "best_balanced_acc": 100.0 * float(best["test_balanced_acc"]) if "test_balanced_acc" in best else math.nan,
            "best_epoch": float(best.get("epoch", math.nan)),
            "eval_every": float(min(gaps)) if gaps else float(epochs[0] + 1)}


def best_label(setting: str, eval_every: float) -> str:
    """The setting of a best-on-test row: says it was chosen on the test set, and how often the
    test set was evaluated."""
    every = "every epoch" if eval_every == 1 else (f"every {eval_every:g} epochs" if math.isfinite(eval_every)
                                                    else "evaluations of unknown period")
    return f"{setting} — best epoch, chosen on the test set (evaluated {every})"


def best_rows(cells: pd.DataFrame, keys: list[tuple[str, float, str]]) -> pd.DataFrame:
    """Best-on-test cell rows for the (dataset, imbalance, loss) ``keys``: ``loss`` =
    ``<loss>@best``, ``top1_error`` and ``balanced_acc`` of each run's best evaluation (the
    other metrics absent), ``setting`` labelled by :func:`best_label`. Rows of runs without a
    history are dropped; a key none of whose runs has one gives no row."""
    if "best_top1_error" not in cells.columns or not keys:
        return cells.iloc[0:0]
    out = []
    for ds, imb, loss in keys:
        g = cells[(cells["dataset"] == ds) & (cells["imbalance"] == imb) & (cells["loss"] == loss)]
        g = g[g["best_top1_error"].notna()]
        if not len(g):
            continue
        b = g.copy()
        b["setting"] = best_label(g["setting"].iloc[0], float(g["eval_every"].max()))
        b["loss"] = loss + BEST_SUFFIX
        b["top1_error"], b["balanced_acc"] = g["best_top1_error"], g["best_balanced_acc"]
        for m in ("many_acc", "medium_acc", "few_acc", "ece"):
            if m in b.columns:
                b[m] = math.nan
        out.append(b)
    return pd.concat(out, ignore_index=True) if out else cells.iloc[0:0]


def cifar_data_reason(spec: Mapping[str, Any], name: str, results: str | Path | None = None) -> str | None:
    """None when the study's dataset ``name`` is the real CIFAR-10/100 that published CIFAR-LT
    numbers were measured on; otherwise why not, in a few words.

    The real CIFAR is a ``registry`` dataset whose registry name is ``cifar10`` or ``cifar100``
    (its archive is checked against the published md5 when it is downloaded or placed by hand)
    under its own name and, where the prepared dataset's ``source.json`` is under ``results``,
    whose recorded archive sha256 is the official one (:data:`CIFAR_ARCHIVES`). A world
    dataset or an ImageFolder named ``cifar10`` is not.

    >>> cifar_data_reason({"datasets": {"cifar10": {"kind": "world"}}}, "cifar10")
    '`cifar10` is generated (world), not the CIFAR archive'
    >>> cifar_data_reason({"datasets": {"cifar10": {"kind": "registry"}}}, "cifar10") is None
    True
    """
    d = (spec.get("datasets") or {}).get(name)
    if d is None:
        return f"`{name}` is not among the study's datasets, so its source is unknown"
    kind = d.get("kind")
    if kind != "registry":
        article = "an" if str(kind)[:1] in "aeiou" else "a"
        return f"`{name}` is {'generated (world)' if kind == 'world' else f'{article} {kind} dataset'}, not the CIFAR archive"
    reg = d.get("name", name)
    if reg not in CIFAR_ARCHIVES:
        return f"`{name}` is the registry's `{reg}`, not CIFAR-10/100"
    if reg != name:  # published numbers are looked up by the study's name of the dataset
        return f"`{name}` holds the registry's `{reg}` under another name"
    if results is not None:
        from .layout import Layout

        stamp = Path(Layout.at(Path(results)).dataset(name, "source.json"))
        if stamp.exists():
            archive, sha = CIFAR_ARCHIVES[reg]
            got = (json.loads(stamp.read_text()).get("files") or {}).get(archive)
            if got != sha:
                return f"`{name}`'s archive ({archive}, sha256 {str(got)[:12]}…) is not the official {reg} archive"
    return None


def with_published(rows: pd.DataFrame, cb: Mapping[str, Any], data_ok: Mapping[str, bool],
                   published: pd.DataFrame, best: pd.DataFrame | None = None) -> pd.DataFrame:
    """``rows`` (one per dataset, imbalance, loss: the methods table) with ``published_error``,
    ``published_source`` and ``published_note``; and, right after a row whose published number
    differs from it only by being chosen on the test set, that row's best-on-test row from
    ``best`` (rows of the same columns, loss ``<loss>@best``; see :func:`best_rows`), which
    gets the number. A dataset with ``data_ok`` False (not the real CIFAR) gets no published
    number and no note."""
    best_at = {} if best is None else {(d, i, lo): r for (d, i, lo), r in
                                       zip(zip(best["dataset"], best["imbalance"], best["loss"], strict=True),
                                           best.to_dict("records"), strict=True)}
    out = []
    for r in rows.to_dict("records"):
        ds, imb, loss = r["dataset"], r["imbalance"], r["loss"]
        p = pair(published, ds, imb, loss, cb) if data_ok.get(ds) else NONE
        out.append({**r, "published_error": p.error, "published_source": p.source if p.note is None else None,
                    "published_note": p.note})
        b = best_at.get((ds, imb, loss + BEST_SUFFIX))
        if p.wants_best and b is not None:
            q = pair(published, ds, imb, loss, cb, checkpoint=BEST)
            out[-1]["published_note"] = f"{p.note}: see the best-epoch row"
            out.append({**b, "published_error": q.error, "published_source": q.source, "published_note": q.note})
    cols = [*rows.columns, "published_error", "published_source", "published_note"]
    return pd.DataFrame(out, columns=cols)


def wanted_best(rows: pd.DataFrame, cb: Mapping[str, Any], data_ok: Mapping[str, bool],
                published: pd.DataFrame) -> list[tuple[str, float, str]]:
    """The (dataset, imbalance, loss) of ``rows`` whose published number was chosen on the test
    set and whose recipe is otherwise the paper's: those need a best-on-test row."""
    return [(ds, imb, loss) for ds, imb, loss in zip(rows["dataset"], rows["imbalance"], rows["loss"], strict=True)
            if data_ok.get(ds) and pair(published, ds, imb, loss, cb).wants_best]
