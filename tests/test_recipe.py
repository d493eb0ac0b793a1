"""The training recipe: the schema's defaults are the dataclass's, and it imports cheaply."""

import dataclasses
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

from finetail.config import SCHEMA
from finetail.training.recipe import ADDED_SETTINGS, CB_LOSS_TYPES, FEW_SHOT, LOSS_TYPES, MANY_SHOT, PLUGIN_FIELDS, TrainConfig

DEFS = yaml.safe_load(SCHEMA.read_text())


LOSS_FIELDS = {"loss", "beta", "gamma", "max_margin", "scale", "tau", "drw_epoch", "plugin", "plugin_params",
               "plugin_head"}


def test_every_schema_recipe_key_is_a_train_config_field_with_the_same_default():
    recipe = DEFS["$defs"]["recipe"]["properties"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(recipe) <= fields, f"schema recipe keys TrainConfig lacks: {sorted(set(recipe) - fields)}"
    cfg = TrainConfig()
    for key, prop in recipe.items():
        if key in ADDED_SETTINGS:
            # A default would put the key into every job's spec and change the config digest
            # (and so rerun) every cell recorded before the setting existed.
            assert "default" not in prop, f"recipe.{key} was added later: absent means {ADDED_SETTINGS[key]!r}"
            continue
        assert "default" in prop, f"recipe.{key} has no default in the schema"
        assert prop["default"] == getattr(cfg, key), f"recipe.{key}: schema {prop['default']!r}, TrainConfig {getattr(cfg, key)!r}"
    # The fields the schema keeps elsewhere: the loss (per cell), the shot thresholds (per study)
    # and the seed (the seeds lists: one job per seed); the recipe settings added later may
    # not be in the schema yet.
    later = {"sampler", "holdout"} - set(recipe)
    assert fields - set(recipe) - later == LOSS_FIELDS | {"many_shot", "few_shot", "seed"}
    assert set(ADDED_SETTINGS) <= fields and all(getattr(cfg, k) == v for k, v in ADDED_SETTINGS.items())


def test_loss_and_shot_defaults_agree():
    loss = DEFS["$defs"]["loss"]["properties"]
    assert (loss["beta"]["default"], loss["gamma"]["default"]) == (TrainConfig.beta, TrainConfig.gamma)
    assert set(CB_LOSS_TYPES) <= set(loss["type"]["enum"]) <= set(LOSS_TYPES)
    assert {PLUGIN_FIELDS.get(k, k) for k in set(loss) - {"type"}} <= LOSS_FIELDS  # a plugin's params: plugin_params
    for key in set(loss) & set(ADDED_SETTINGS):
        assert "default" not in loss[key], f"loss.{key} was added later: absent means {ADDED_SETTINGS[key]!r}"
    shots = DEFS["properties"]["shots"]["properties"]
    assert (shots["many"]["default"], shots["few"]["default"]) == (MANY_SHOT, FEW_SHOT)
    assert (TrainConfig.many_shot, TrainConfig.few_shot) == (MANY_SHOT, FEW_SHOT)


@pytest.mark.parametrize("module", ["finetail.config", "finetail.training.recipe", "finetail.training"])
def test_recipe_and_config_import_neither_torch_nor_numpy(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_validating_the_study_files_and_planning_imports_no_torch():
    """What the Snakefile runs while it parses the DAG (config checks of both study files,
    the layout, the code digests of every command) imports neither torch nor mlflow."""
    code = (
        "import sys\n"
        "from finetail.config import load_config\n"
        "from finetail.code import code_digest\n"
        "from finetail.layout import Layout\n"
        "for f in ('workflow/studies/paper.yaml', 'config.yaml'):\n"
        "    load_config(f)\n"
        "for c in ('generate', 'prepare', 'longtail', 'train', 'pool', 'features', 'similarity', 'select', 'report'):\n"
        "    code_digest(c)\n"
        "print(sorted(m for m in ('torch', 'mlflow', 'torchvision') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
