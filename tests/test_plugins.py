"""Plugins (finetail.plugins): a researcher's own loss, post-hoc correction and transferability
score, named by module:callable or by an installed package's entry point, run beside the
built-ins; their code in the job's digest and the lineage; bad plugins stopped in one line."""

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from finetail.config import ConfigError, load_config
from finetail.plugins import (
    PluginError,
    check_signature,
    load,
    plugin_digest,
    source_files,
)

from conftest import ROOT
from helpers import TINY, planned, snakemake

EXAMPLE = ROOT / "examples" / "finetail-extras"

# The plugins of the reduced study: each kind in its own file beside the study file, so that
# an edit to one plans exactly the jobs that run it. plugin_helpers.py is imported by the loss,
# so it is part of the loss's code.
PLUGIN_FILES = {
    "plugin_helpers.py": """
        import torch


        def log_prior(counts):
            return torch.log(counts.double() / counts.sum()).float()
        """,
    "plugin_loss.py": """
        import torch.nn.functional as F
        from torch import nn

        from plugin_helpers import log_prior


        class PriorShifted(nn.Module):
            def __init__(self, counts, tau=1.0):
                super().__init__()
                self.register_buffer("shift", tau * log_prior(counts))

            def forward(self, logits, targets):
                return F.cross_entropy(logits + self.shift, targets)
        """,
    "plugin_posthoc.py": """
        import torch


        def adjust(logits, counts, tau=1.0):
            return logits - tau * torch.log(counts.double() / counts.sum()).float()
        """,
    "plugin_score.py": """
        import numpy as np


        def fisher(features, labels):
            mu = features.mean(axis=0)
            between = sum((labels == c).sum() * ((features[labels == c].mean(axis=0) - mu) ** 2).sum()
                          for c in np.unique(labels))
            return float(between / ((features - mu) ** 2).sum())


        def top1_agreement(features, labels, probs=None):
            return float((probs.argmax(axis=1) == labels).mean())
        """,
    # broken on purpose
    "plugin_bad.py": """
        import torch


        def scalar_per_image(counts):
            return torch.nn.CrossEntropyLoss(reduction="none")


        class NaNLoss(torch.nn.Module):
            def __init__(self, counts):
                super().__init__()

            def forward(self, logits, targets):
                return (logits * float("nan")).mean()


        def wrong_signature():
            return None


        def raising_score(features, labels):
            raise RuntimeError("the score plugin's own bug")


        def wrong_shape(logits, counts):
            return logits[:, :1]
        """,
    "plugin_cosine.py": """
        import torch.nn.functional as F
        from torch import nn


        class CosineMargin(nn.Module):
            head = "normed"  # a cosine head, as LDAM's: the contract's head

            def __init__(self, counts, scale=10.0):
                super().__init__()
                self.scale = scale

            def forward(self, logits, targets):
                return F.cross_entropy(self.scale * logits, targets)
        """,
    "plugin_broken_import.py": """
        import a_package_nobody_installed  # noqa: F401
        """,
}


def write_plugins(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in PLUGIN_FILES.items():
        (folder / name).write_text(textwrap.dedent(text).lstrip())
    return folder


# --------------------------------------------------------------------------- finding, digest, signature
def test_source_files_follow_local_imports_without_importing(tmp_path):
    d = write_plugins(tmp_path / "p")
    files = source_files("plugin_loss", [str(d)])
    assert [rel for rel, _ in files] == ["plugin_helpers.py", "plugin_loss.py"]  # not torch, not finetail
    assert "plugin_loss" not in sys.modules and "plugin_helpers" not in sys.modules  # nothing was imported
    before = plugin_digest("loss", "plugin_loss:PriorShifted", [str(d)])
    assert before == plugin_digest("loss", "plugin_loss:PriorShifted", [str(d)])
    (d / "plugin_helpers.py").write_text((d / "plugin_helpers.py").read_text() + "\n# an edit\n")
    assert plugin_digest("loss", "plugin_loss:PriorShifted", [str(d)]) != before  # an imported file counts
    assert plugin_digest("posthoc", "plugin_posthoc:adjust", [str(d)]) == plugin_digest(
        "posthoc", "plugin_posthoc:adjust", [str(d)])


def test_signature_check_names_unknown_missing_and_reserved_keys(tmp_path):
    d = write_plugins(tmp_path / "p")
    loss = load("loss", "plugin_loss:PriorShifted", [str(d)])
    assert check_signature(loss, {"tau": 0.5}) == {} and loss.head == "linear"
    with pytest.raises(PluginError, match=r"takes tau; unknown \['tua'\]$"):
        check_signature(loss, {"tua": 0.5})
    with pytest.raises(PluginError, match=r"\['counts'\] is given by finetail, not the study"):
        check_signature(loss, {"counts": [1]})
    score = load("score", "plugin_score:top1_agreement", [str(d)])
    assert check_signature(score) == {"probs": True}
    with pytest.raises(PluginError, match="a score plugin takes no parameters"):
        check_signature(score, {"k": 1})
    bad = load("loss", "plugin_bad:wrong_signature", [str(d)])
    with pytest.raises(PluginError, match=r"takes 0 positional argument\(s\), but a loss plugin is callable\(counts"):
        check_signature(bad)


@pytest.mark.parametrize("ref,message", [
    ("plugin_broken_import:anything",
     r"module 'plugin_broken_import' does not import: ModuleNotFoundError: No module named 'a_package_nobody_installed'"),
    ("plugin_loss:NoSuchLoss", r"module 'plugin_loss' has no 'NoSuchLoss' \(it has .*PriorShifted"),
    ("no_such_module:fn", r"module 'no_such_module' is not on sys.path"),
    ("no_such_entry_point", r"no installed package has an entry point 'no_such_entry_point' in group finetail.losses"),
    ("a b", r"name an installed entry point \(finetail.losses\) or module:callable"),
])
def test_a_plugin_that_cannot_load_is_one_line(tmp_path, ref, message):
    d = write_plugins(tmp_path / "p")
    with pytest.raises(PluginError, match=message) as e:
        load("loss", ref, [str(d)])
    assert "\n" not in str(e.value)


def _study(folder: Path, edit=None) -> Path:
    """A small study file in ``folder`` (plugins beside it), edited by ``edit(cfg)``."""
    cfg = copy.deepcopy(PLUGIN_STUDY)
    if edit:
        edit(cfg)
    write_plugins(folder)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["cbloss"]["losses"]["prior"].update(params={"tua": 1.0}),
     r"^cbloss.losses.prior: loss plugin 'plugin_loss:PriorShifted' takes tau; unknown \['tua'\]$"),
    (lambda c: c["cbloss"]["losses"]["prior"].update(plugin="plugin_broken_import:x"),
     r"^cbloss.losses.prior: .*does not import: ModuleNotFoundError: No module named 'a_package_nobody_installed'$"),
    (lambda c: c["cbloss"]["losses"]["prior"].update(plugin="plugin_loss:Missing"),
     r"^cbloss.losses.prior: loss plugin 'plugin_loss:Missing': module 'plugin_loss' has no 'Missing'"),
    (lambda c: c["cbloss"]["posthoc"]["adjust"].update(plugin="plugin_bad:wrong_signature"),
     r"^cbloss.posthoc.adjust: posthoc plugin 'plugin_bad:wrong_signature' has the signature \(\)"),
    (lambda c: c["cbloss"]["posthoc"]["adjust"].update(tau=1.0), r"^cbloss.posthoc.adjust: a plugin correction takes params, not tau$"),
    (lambda c: c["transfer"]["transferability"]["plugins"].update(fisher="plugin_bad:wrong_signature"),
     r"^transfer.transferability.plugins.fisher: score plugin .* takes 0 positional"),
    (lambda c: c["transfer"]["transferability"]["plugins"].update(logme="plugin_score:fisher"),
     r"^transfer.transferability.plugins.logme: the name is a built-in score's"),
])
def test_bad_plugins_are_refused_when_the_study_is_loaded(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(_study(tmp_path / "s", edit))
    assert "\n" not in str(e.value)


def test_the_example_study_files_load(tmp_path):
    """study.yaml names the example package's code as module:callable, found beside it."""
    cfg = load_config(EXAMPLE / "study.yaml")
    assert cfg["cbloss"]["losses"]["seql"]["plugin"] == "finetail_extras.losses:SoftmaxEqualizationLoss"
    over = yaml.safe_load((EXAMPLE / "installed.yaml").read_text())
    assert over["cbloss"]["losses"]["seql"]["plugin"] == "seql" and over["transfer"]["transferability"]["plugins"] == {
        "gbc": "gbc"}


# --------------------------------------------------------------------------- the contracts, in-process
def test_a_loss_that_is_not_a_scalar_or_raises_is_one_line(tmp_path):
    from finetail.losses import build_plugin_loss
    from finetail.training.recipe import TrainConfig

    d = write_plugins(tmp_path / "p")
    os.environ["FINETAIL_PLUGIN_PATH"] = str(d)
    try:
        cfg = TrainConfig.from_spec({"loss": {"type": "plugin", "plugin": "plugin_bad:scalar_per_image"}})
        loss = build_plugin_loss(cfg, [5, 3, 1])
        with pytest.raises(PluginError, match=r"returned a tensor of shape \(4,\) for a batch of 4; a loss returns a "
                                              r"scalar"):
            loss(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]))
        with pytest.raises(PluginError, match=r"loss plugin 'plugin_bad:scalar_per_image' raised IndexError"):
            loss(torch.zeros(4, 3), torch.tensor([0, 1, 7, 0]))  # target 7 of 3 classes: the plugin's error
        ok = build_plugin_loss(TrainConfig.from_spec({"loss": {"type": "plugin", "plugin": "plugin_loss:PriorShifted",
                                                                "params": {"tau": 0.0}}}), [5, 3, 1])
        assert float(ok(torch.zeros(2, 3), torch.tensor([0, 1]))) == pytest.approx(np.log(3))
    finally:
        del os.environ["FINETAIL_PLUGIN_PATH"]


def test_a_plugin_loss_keeps_its_recipe_key_and_refuses_built_in_keys():
    from finetail.training.recipe import TrainConfig, key_settings

    cfg = TrainConfig.from_spec({"loss": {"type": "plugin", "plugin": "m:f", "params": {"a": 1}, "head": "normed"}})
    assert (cfg.plugin, cfg.plugin_params, cfg.head) == ("m:f", {"a": 1}, "normed")
    assert "plugin" not in key_settings(TrainConfig())  # built-in recipes keep their resume keys
    with pytest.raises(ValueError, match="loss 'plugin' takes no 'tau'"):
        TrainConfig.from_spec({"loss": {"type": "plugin", "plugin": "m:f", "tau": 2.0}})
    with pytest.raises(ValueError, match="loss 'softmax' takes no 'plugin'"):
        TrainConfig.from_spec({"loss": {"type": "softmax", "plugin": "m:f"}})


def test_a_loss_plugin_asks_for_its_head(tmp_path, monkeypatch):
    """A plugin that declares head = "normed" trains on a cosine head; the head joins the
    cell's spec, so post-hoc jobs rebuild the same network, and tau_norm of it is refused."""
    from finetail.models import NormedLinear, build_model
    from finetail.training.job import _plugin_loss
    from finetail.training.recipe import TrainConfig

    d = write_plugins(tmp_path / "p")
    monkeypatch.setenv("FINETAIL_PLUGIN_PATH", str(d))
    spec = {"recipe": {"model": "resnet8", "width": 4}, "loss": {"type": "plugin", "plugin": "plugin_cosine:CosineMargin"}}
    spec2, cfg, info = _plugin_loss(spec, TrainConfig.from_spec(spec))
    assert spec2["loss"]["head"] == "normed" and "head" not in spec["loss"] and info["ref"] == "plugin_cosine:CosineMargin"
    assert cfg.head == TrainConfig.from_spec(spec2).head == "normed"
    assert isinstance(build_model(cfg.model, 3, cfg.width, head=cfg.head).head, NormedLinear)

    def normed(c):
        c["cbloss"]["losses"]["prior"] = {"type": "plugin", "plugin": "plugin_cosine:CosineMargin"}
        c["cbloss"]["posthoc"]["tau"] = {"method": "tau_norm", "tau": 1.0, "losses": ["prior"]}

    with pytest.raises(ConfigError, match="cbloss.posthoc.tau: tau_norm on the cells of 'prior' changes nothing"):
        load_config(_study(tmp_path / "s", normed))


def test_corrections_and_scores_are_checked(tmp_path):
    from finetail.posthoc import plugin_correction
    from finetail.scoring import load_score_plugins, plugin_scores

    d = write_plugins(tmp_path / "p")
    wrong = load("posthoc", "plugin_bad:wrong_shape", [str(d)])
    with pytest.raises(PluginError, match=r"returned shape \(2, 1\); the corrected logits are \(2, 3\)"):
        plugin_correction(wrong, {}, torch.zeros(2, 3), np.array([5, 3, 1]), {}, {})
    adjust = load("posthoc", "plugin_posthoc:adjust", [str(d)])
    out = plugin_correction(adjust, {}, torch.zeros(1, 2), np.array([3, 1]), {"tau": 1.0}, {"features": None})
    assert out[0].tolist() == pytest.approx([-np.log(0.75), -np.log(0.25)])
    os.environ["FINETAIL_PLUGIN_PATH"] = str(d)
    try:
        feats, labels = np.random.default_rng(0).normal(size=(20, 4)), np.repeat([0, 1], 10)
        probs = np.full((20, 3), 1 / 3)
        probs[:, 0] += 0.1
        probs[:, 1] -= 0.1
        got = plugin_scores(load_score_plugins({"agree": "plugin_score:top1_agreement"}), feats, probs, labels)
        assert got["agree"][0] == pytest.approx(0.5)  # argmax 0 everywhere, half the labels are 0
        with pytest.raises(PluginError, match=r"score plugin 'bad' \(plugin_bad:raising_score\) raised RuntimeError: "
                                              r"the score plugin's own bug; no scores.csv is written"):
            plugin_scores(load_score_plugins({"bad": "plugin_bad:raising_score"}), feats, probs, labels)
    finally:
        del os.environ["FINETAIL_PLUGIN_PATH"]


# --------------------------------------------------------------------------- a reduced study with plugins
RECIPE = {"model": "resnet8", "width": 4, "epochs": 2, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1,
          "milestones": [1], "lr_factors": [0.1], "eval_every": 2, "crop_pad": 2}
PLUGIN_STUDY = {
    "study": "plugins",
    "replicates": {"count": 2},
    "world": {"seed": 0, "image_size": 16},
    "datasets": {"gen10": {"kind": "world", "train_per_class": 40, "test_per_class": 10},
                 **{d: {"kind": "world", "train_per_class": 12, "test_per_class": 6}
                    for d in ("generic", "natural", "cub200")}},
    "cbloss": {
        "datasets": ["gen10"],
        "imbalance": [10],
        "losses": {"softmax": {"type": "softmax"}, "cb_focal": {"type": "focal", "beta": 0.99, "gamma": 0.5},
                   "prior": {"type": "plugin", "plugin": "plugin_loss:PriorShifted", "params": {"tau": 1.0}}},
        "posthoc": {"adjust": {"method": "plugin", "plugin": "plugin_posthoc:adjust", "params": {"tau": 1.0},
                               "losses": ["softmax"]}},
        "recipe": RECIPE,
    },
    "shots": {"many": 30, "few": 10},
    "transfer": {
        "sources": {"generic": ["generic"], "natural": ["natural"]},
        "transferability": {"scores": ["logme"], "plugins": {"fisher": "plugin_score:fisher"}},
        "targets": ["cub200"],
        "features": {"model": "generic"},
        "similarity": {"min_source_images": 2},
        "pretrain": {"recipe": RECIPE | {"epochs": 1}},
        "finetune": {"recipe": RECIPE, "scratch": False},
    },
}


def run_study(work: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    write_plugins(work)  # beside study.yaml, which snakemake() writes into work
    return snakemake(work, config, *args)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = tmp_path_factory.mktemp("plugins")
    r = run_study(work, PLUGIN_STUDY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work


@pytest.mark.slow
def test_plugins_run_beside_the_built_ins(study):
    res = study / "results" / "plugins"
    for seed in (0, 1):
        m = json.loads((res / f"cbloss/gen10/if10/prior/seed{seed}/metrics.json").read_text())
        assert m["plugin"]["ref"] == "plugin_loss:PriorShifted" and m["plugin"]["distribution"] is None
        assert [rel for rel, _ in m["plugin"]["files"]] == ["plugin_helpers.py", "plugin_loss.py"]
        assert m["plugin"]["digest"] == plugin_digest("loss", "plugin_loss:PriorShifted", [str(study)])
        assert m["config"]["loss"]["params"] == {"tau": 1.0} and 0 <= m["final"]["top1_error"] <= 1
        ph = json.loads((res / f"posthoc/gen10/if10/softmax/adjust/seed{seed}/metrics.json").read_text())
        cell = json.loads((res / f"cbloss/gen10/if10/softmax/seed{seed}/metrics.json").read_text())
        assert ph["parent_run_id"] == cell["run_id"] and ph["posthoc"]["plugin"] == "plugin_posthoc:adjust"
        assert ph["plugin"]["digest"] == plugin_digest("posthoc", "plugin_posthoc:adjust", [str(study)])
        for source in ("generic", "natural"):
            sc = pd.read_csv(res / f"transferability/{source}/cub200/rep{seed}/scores.csv")
            assert 0 < sc["fisher"].iloc[0] < 1 and sc["fisher_plugin"].iloc[0].startswith("plugin plugin_score:fisher")
    rep = res / "report"
    methods = pd.read_csv(rep / "cbloss_methods.csv").set_index("loss")
    assert sorted(methods.index) == ["cb_focal", "prior", "softmax", "softmax+adjust"]
    digest = plugin_digest("loss", "plugin_loss:PriorShifted", [str(study)])
    assert methods.loc["prior", "setting"] == f"plugin_loss:PriorShifted (tau=1) [plugin, code {digest}]"
    assert methods.loc["softmax+adjust", "setting"].startswith("softmax + plugin_posthoc:adjust (tau=1) [plugin, code ")
    assert (methods["top1_error_n"] == 2).all()
    paired = pd.read_csv(rep / "cbloss_paired.csv")
    assert {"prior", "cb_focal", "softmax+adjust"} <= set(paired["loss"]) and set(paired["n"]) == {2}
    cells = pd.read_csv(rep / "cbloss_cells.csv")
    assert set(cells.loc[cells["loss"] == "prior", "plugin_digest"]) == {digest}
    scores = pd.read_csv(rep / "transferability.csv").set_index("score")
    assert list(scores.index) == ["emd", "logme", "fisher"]
    assert scores.loc["fisher", "label"].startswith("fisher [plugin plugin_score:fisher, code ")
    assert "[plugin, code " in (rep / "summary.md").read_text()


@pytest.mark.slow
def test_editing_a_plugin_plans_its_jobs_and_the_report_only(study):
    r = run_study(study, PLUGIN_STUDY, "-n")
    assert r.returncode == 0 and planned(r) == {}
    for name, expected in [("plugin_helpers.py", {"cbloss": 2}), ("plugin_loss.py", {"cbloss": 2}),
                           ("plugin_posthoc.py", {"posthoc_plugin": 2}), ("plugin_score.py", {"transferability": 4})]:
        f = study / name
        before = f.read_text()
        try:
            f.write_text(before + "\n# an edit\n")
            cfg = study / "study.yaml"
            cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(study),
                   "--configfile", str(cfg), "--cores", "1", "-n"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr[-2000:]
            assert planned(r) == {**expected, "report": 1, "all": 1}, name
        finally:
            f.write_text(before)
    r = run_study(study, PLUGIN_STUDY, "-n")
    assert planned(r) == {}


@pytest.mark.slow
def test_lineage_of_a_plugin_row_names_the_plugin_and_its_digest(study):
    res = study / "results" / "plugins"
    digest = plugin_digest("loss", "plugin_loss:PriorShifted", [str(study)])
    out = subprocess.run([sys.executable, "-m", "finetail.cli", "lineage", "cbloss:gen10:if10:prior:seed1",
                          "--results", str(res)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "plugin loss plugin_loss:PriorShifted -> plugin_loss:PriorShifted  (not installed)" in out.stdout
    assert f"code sha256 {digest} ok" in out.stdout
    assert f"file plugin_loss.py {(study / 'plugin_loss.py').resolve()}" in out.stdout
    chain = json.loads(subprocess.run([sys.executable, "-m", "finetail.cli", "lineage", "--json",
                                       "posthoc:gen10:if10:softmax:adjust:seed0", "--results", str(res)],
                                      capture_output=True, text=True, timeout=300).stdout)
    assert chain["plugin"]["ref"] == "plugin_posthoc:adjust" and chain["plugin"]["status"] == "ok"


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a finetail command that failed cleanly (no traceback)."""
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "error: " in line]
    assert len(errors) == 1, out[-3000:]
    return errors[0]


def _finetail(*args: str, plugin_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FINETAIL_PLUGIN_PATH": str(plugin_dir), "FINETAIL_WORKER": "off"}
    return subprocess.run([sys.executable, "-m", "finetail.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("plugin,message", [
    ("plugin_bad:scalar_per_image", r"loss plugin 'plugin_bad:scalar_per_image' returned a tensor of shape \(32,\)"),
    ("plugin_bad:NaNLoss", r"training diverged: the loss became non-finite \(NaN or inf\) at epoch 1, step 1"),
    # (a missing callable or a wrong signature: refused when the study loads, above; the job checks the same way)
    ("plugin_broken_import:x", r"does not import: ModuleNotFoundError: No module named 'a_package_nobody_installed'"),
])
def test_a_bad_loss_plugin_job_writes_nothing(study, tmp_path, plugin, message):
    import re

    res = study / "results" / "plugins"
    spec = {"recipe": {**RECIPE, "seed": 0}, "loss": {"type": "plugin", "plugin": plugin}}
    out = tmp_path / "out"
    r = _finetail("train", "--manifest", str(res / "longtail/gen10_if10/rep0/manifest.parquet"), "--spec",
                  json.dumps(spec), "--out-dir", str(out), "--checkpoint", str(tmp_path / "ck" / "last.pt"),
                  "--study-dir", str(tmp_path), plugin_dir=study, cwd=tmp_path)
    assert re.search(message, _one_error_line(r))
    assert not (out / "metrics.json").exists()


@pytest.mark.slow
def test_a_bad_correction_or_score_job_writes_nothing(study, tmp_path):
    res = study / "results" / "plugins"
    cell = res / "cbloss/gen10/if10/softmax/seed0"
    r = _finetail("posthoc", "--manifest", str(res / "longtail/gen10_if10/rep0/manifest.parquet"), "--model",
                  str(cell / "model.pt"), "--cell-metrics", str(cell / "metrics.json"), "--method", "plugin",
                  "--plugin", "plugin_bad:wrong_shape", "--out-dir", str(tmp_path / "ph"), "--study-dir", str(tmp_path),
                  plugin_dir=study, cwd=tmp_path)
    assert "post-hoc plugin 'plugin_bad:wrong_shape' returned shape (100, 1)" in _one_error_line(r)
    assert not (tmp_path / "ph" / "metrics.json").exists()
    spec = {"scores": ["logme"], "plugins": {"bad": "plugin_bad:raising_score"}, "source": "generic", "target": "cub200"}
    r = _finetail("transferability", "--models", str(res / "pretrain/generic/seed0/model.pt"), "--seeds", "0",
                  "--manifest", str(res / "datasets/cub200/rep0/manifest.parquet"), "--spec", json.dumps(spec),
                  "--out", str(tmp_path / "sc" / "scores.csv"), "--device", "cpu", plugin_dir=study, cwd=tmp_path)
    assert "score plugin 'bad' (plugin_bad:raising_score) raised RuntimeError: the score plugin's own bug" in \
        _one_error_line(r)
    assert not (tmp_path / "sc" / "scores.csv").exists()


# --------------------------------------------------------------------------- an installed package's entry points
def _installed_example(site: Path) -> Path:
    """The example package as pip would leave it on a site folder: its code and a dist-info
    whose entry_points.txt is the pyproject's (importlib.metadata finds it on sys.path)."""
    shutil.copytree(EXAMPLE / "finetail_extras", site / "finetail_extras")
    info = site / "finetail_extras-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: finetail-extras\nVersion: 0.1.0\n")
    (info / "top_level.txt").write_text("finetail_extras\n")
    import tomllib

    eps = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()) + "\n" for group, items in eps.items()))
    return site


@pytest.mark.slow
def test_the_example_by_entry_point_gives_the_numbers_of_its_module_callable(study, tmp_path):
    """The example package's loss, correction and score, named by entry point (a dist-info on
    PYTHONPATH, as `pip install -e examples/finetail-extras` leaves) and by module:callable:
    the same numbers, the same code digest; the installed one records its distribution."""
    site = _installed_example(tmp_path / "site")
    res = study / "results" / "plugins"
    manifest = res / "longtail/gen10_if10/rep0/manifest.parquet"
    env_path = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    recipe = {**RECIPE, "seed": 0, "holdout": 0.2}

    def run(*args):
        env = {**os.environ, **env_path, "FINETAIL_WORKER": "off"}
        r = subprocess.run([sys.executable, "-m", "finetail.cli", *args], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    got = {}
    for how, loss, corr, score in [("entry", "seql", "rate_balance", "gbc"),
                                   ("module", "finetail_extras.losses:SoftmaxEqualizationLoss",
                                    "finetail_extras.posthoc:balance_prediction_rate", "finetail_extras.scores:gbc")]:
        out = tmp_path / how
        spec = {"recipe": recipe, "loss": {"type": "plugin", "plugin": loss, "params": {"lam": 0.05, "gamma": 0.9}}}
        run("train", "--manifest", str(manifest), "--spec", json.dumps(spec), "--out-dir", str(out / "cell"),
            "--checkpoint", str(out / "ck" / "last.pt"), "--study-dir", str(out), "--save-model", str(out / "cell" / "model.pt"))
        run("posthoc", "--manifest", str(manifest), "--model", str(out / "cell" / "model.pt"), "--cell-metrics",
            str(out / "cell" / "metrics.json"), "--method", "plugin", "--plugin", corr, "--plugin-params", '{"iters": 50}',
            "--out-dir", str(out / "ph"), "--study-dir", str(out))
        run("transferability", "--models", str(out / "cell" / "model.pt"), "--seeds", "0", "--manifest", str(manifest),
            "--spec", json.dumps({"scores": [], "plugins": {"gbc": score}}), "--out", str(out / "scores.csv"),
            "--device", "cpu")
        got[how] = (json.loads((out / "cell" / "metrics.json").read_text()),
                    json.loads((out / "ph" / "metrics.json").read_text()), pd.read_csv(out / "scores.csv"))
    (cell_e, ph_e, sc_e), (cell_m, ph_m, sc_m) = got["entry"], got["module"]
    assert cell_e["final"] == cell_m["final"] and ph_e["final"] == ph_m["final"]
    assert sc_e["gbc"].iloc[0] == sc_m["gbc"].iloc[0]
    assert cell_e["plugin"]["digest"] == cell_m["plugin"]["digest"] and ph_e["plugin"]["digest"] == ph_m["plugin"]["digest"]
    assert [rel for rel, _ in cell_e["plugin"]["files"]] == ["finetail_extras/__init__.py", "finetail_extras/losses.py"]
    assert cell_e["plugin"]["entry_point"] == "finetail.losses:seql"
    assert (cell_e["plugin"]["distribution"], cell_e["plugin"]["version"]) == ("finetail-extras", "0.1.0")
    gbc = plugin_digest("score", "finetail_extras.scores:gbc", [str(site)])
    assert sc_e["gbc_plugin"].iloc[0] == f"plugin gbc, finetail-extras 0.1.0, code {gbc}"
    assert sc_m["gbc_plugin"].iloc[0].endswith(f"code {gbc}")


# --------------------------------------------------------------------------- records: lineage and the report's marks
def test_lineage_says_whether_a_plugins_files_still_match(tmp_path):
    from finetail.provenance.walk import plugin_node

    d = write_plugins(tmp_path / "p")
    info = load("loss", "plugin_loss:PriorShifted", [str(d)]).info()
    assert plugin_node(info)["status"] == "ok"
    (d / "plugin_helpers.py").write_text((d / "plugin_helpers.py").read_text() + "\n# an edit\n")
    node = plugin_node(info)
    assert node["status"] == "changed" and node["actual"] != info["digest"]
    (d / "plugin_helpers.py").unlink()
    assert plugin_node(info)["status"] == "missing"


def test_a_report_row_of_one_plugin_needs_one_version_of_its_code(tmp_path):
    from finetail.record import MetricsRecord
    from finetail.report import plugin_mark

    def run(digest, dist=None):
        return tmp_path / f"{digest}.json", MetricsRecord(extra={"plugin": {"ref": "m:f", "digest": digest,
                                                                            "distribution": dist, "version": "1.2"}})

    assert plugin_mark([run("aaa"), run("aaa")]) == " [plugin, code aaa]"
    assert plugin_mark([run("aaa", "mypkg")]) == " [plugin, mypkg 1.2]"
    with pytest.raises(ValueError, match="ran different code of their plugin"):
        plugin_mark([run("aaa"), run("bbb")])
    with pytest.raises(ValueError, match="records no plugin"):
        plugin_mark([run("aaa"), (tmp_path / "x.json", MetricsRecord())])
