# finetail: the study "Learning from Fine-Grained and Long-Tailed Visual Data" as one DAG.
# Logic lives in src/finetail; rules call `finetail <stage>` with the config subtree they need.
from snakemake.utils import min_version, validate

min_version("9.0")


# The default study, unless a study file is given with --configfile: a study file replaces it
# whole (Snakemake would otherwise merge the two, e.g. mixing both studies' datasets).
# The path is the checkout's, so `--directory elsewhere` still finds it.
if not workflow.config_settings.configfiles:

    configfile: f"{workflow.basedir}/config.yaml"


from finetail.config import check_legacy

check_legacy(config)  # keys earlier versions took (cbloss.seeds ...), named with what replaced them
validate(config, schema="workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/worker.smk"


wildcard_constraints:
    dataset=alternation(config["datasets"]),
    imbalance=alternation(imbalance_tag(i) for i in CB["imbalance"]) if CB else "^$",
    loss=alternation(list((CB or {}).get("losses", {})) + list((NAT or {}).get("losses", {}))),
    model=alternation(NAT_MODELS),
    source=alternation(ALL_SOURCES + ["scratch"] + list(FEATURE_NETWORKS)) if TR else "^$",
    target=alternation(TARGETS) if TR else "^$",
    fdataset=alternation(ALL_SOURCES + TARGETS) if TR else "^$",
    seed=r"\d+",
    method=alternation(POSTHOC) if POSTHOC else "^$",


include: "workflow/rules/datasets.smk"
include: "workflow/rules/longtail.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/posthoc.smk"
# The transfer half's own stages exist only in a study that has one: a disabled stage builds no
# path patterns (a cbloss-only study would otherwise plan results/<study>/features//...).
if TR:

    include: "workflow/rules/similarity.smk"
    include: "workflow/rules/transfer.smk"
    include: "workflow/rules/transferability.smk"


include: "workflow/rules/report.smk"


rule all:
    input:
        get_final_outputs(),
    default_target: True
