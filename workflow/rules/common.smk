# Helpers shared by the stages: paths, config subtrees as JSON, wildcard alternations.
import json
import shlex
import shutil
import sys
from pathlib import Path

from finetail.config import check_config, imbalance_tag

check_config(config)

# Jobs call `finetail`, found on PATH (passed on to remote jobs too). When Snakemake runs
# from a virtual environment that is not activated (.venv/bin/snakemake), put that
# environment's bin/ on the jobs' PATH.
envvars:
    "PATH",


if shutil.which("finetail") is None:
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

STUDY = config["study"]
RESULTS = f"results/{STUDY}"
LOGS = f"logs/{STUDY}"
EXPERIMENT = config["tracking"]["experiment"] or f"finetail-{STUDY}"
CB = config.get("cbloss")
TRACKING_ARGS = f"--tracking-uri {shlex.quote(config['tracking']['uri'])}" if config["tracking"]["uri"] else ""


def as_json(obj):
    """A config subtree as canonical JSON, for `--spec {params.spec:q}`."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def alternation(values):
    return "|".join(sorted(re.escape(str(v)) for v in values)) or "^$"


def get_world_spec(wildcards):
    return as_json({"world": config["world"], "dataset": config["datasets"][wildcards.dataset]})


def get_cbloss_spec(wildcards):
    return as_json(
        {
            "recipe": CB["recipe"],
            "loss": CB["losses"][wildcards.loss],
            "shots": config["shots"],
        }
    )


def get_wildcards_json(wildcards):
    return as_json(dict(wildcards.items()))


def get_cbloss_metrics():
    if not CB:
        return []
    return expand(
        f"{RESULTS}/cbloss/{{dataset}}/if{{imbalance}}/{{loss}}/metrics.json",
        dataset=CB["datasets"],
        imbalance=[imbalance_tag(i) for i in CB["imbalance"]],
        loss=list(CB["losses"]),
    )


def get_final_outputs():
    return [f"{RESULTS}/report/summary.md"]
