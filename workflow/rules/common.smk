# Helpers shared by the rule files: paths, config subtrees as JSON, wildcard constraints.
import json

from finetail.config import check_config, imbalance_tag

check_config(config)

STUDY = config["study"]
RESULTS = f"results/{STUDY}"
LOGS = f"logs/{STUDY}"
EXPERIMENT = config["tracking"]["experiment"] or f"finetail-{STUDY}"
CB = config.get("cbloss")


def as_json(obj):
    """A config subtree as canonical JSON, for `--spec {params.spec:q}`."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def alternation(values):
    return "|".join(sorted(re.escape(str(v)) for v in values)) or "^$"


wildcard_constraints:
    dataset=alternation(config["datasets"]),
    imbalance=alternation(imbalance_tag(i) for i in CB["imbalance"]) if CB else "^$",
    loss=alternation(CB["losses"]) if CB else "^$",


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
