# finetail: the study "Learning from Fine-Grained and Long-Tailed Visual Data" as one DAG.
# Logic lives in src/finetail; rules call `finetail <stage>` with the config subtree they need.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, schema="workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/longtail.smk"
include: "workflow/rules/cbloss.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        get_final_outputs(),
    default_target: True
