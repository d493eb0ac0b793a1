"""The Slurm profile covers every rule of the workflow, without a Slurm: each rule has its
set-resources, each rule that trains (its shell runs `finetail train`) is sent the time-limit
signal, so that a job near its limit or preempted checkpoints and resumes (issue 26: the feature
network, post-hoc and cRT rules had none), and GPUs go to exactly the rules that declare them."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from helpers import PROFILE

# The workflow's rules as Snakemake parses them (the default study defines every rule).
RULES = """
import json, sys, tempfile
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings

with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
    wf = api.workflow(resource_settings=ResourceSettings(), config_settings=ConfigSettings(),
                      storage_settings=StorageSettings(), snakefile=Path(sys.argv[1]), workdir=Path(tempfile.mkdtemp()))
    wf.list_rules()
    gpus = {r.name: getattr(r.resources.get("gpu"), "value", None) for r in wf._workflow.rules}
    print(json.dumps({r.name: {"shell": r.shellcmd, "gpu": gpus[r.name]} for r in wf._workflow.rules}))
"""


@pytest.fixture(scope="module")
def rules():
    r = subprocess.run([sys.executable, "-c", RULES, str(ROOT / "Snakefile")], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    found.pop("all")
    return found


@pytest.fixture(scope="module")
def profile():
    return yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]


def test_every_rule_has_resources_and_every_one_named_exists(rules, profile):
    assert {"cbloss", "feature_network", "posthoc", "crt"} <= set(rules)  # the parse found the rules
    assert sorted(set(rules) - set(profile)) == []
    assert sorted(set(profile) - set(rules)) == []  # no misspelt rule


def test_every_rule_that_trains_gets_the_time_limit_signal(rules, profile):
    training = sorted(name for name, rule in rules.items() if (rule["shell"] or "").startswith("finetail train"))
    assert training == ["cbloss", "cbloss_natural", "crt", "feature_network", "finetune", "pretrain"]
    for name in training:
        assert "--signal=TERM@" in profile[name].get("slurm_extra", ""), name
        assert profile[name]["runtime"] > 5  # minutes: room for the signal's 300 s before the limit
    for name in set(rules) - set(training):  # a signal before the limit helps only a job that checkpoints
        assert "--signal" not in profile[name].get("slurm_extra", ""), name


def test_gpus_go_to_the_rules_that_declare_them(rules, profile):
    for name, rule in rules.items():
        assert bool(profile[name].get("gpu")) == bool(rule["gpu"]), name
