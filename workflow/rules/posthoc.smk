# Post-hoc corrections of trained long-tail cells (cbloss.posthoc): tau-normalisation of the
# classifier (Kang et al. 2020) or post-hoc logit adjustment (Menon et al. 2021) of a cell's
# saved model, evaluated on the cell's test split. No retraining: adding a correction to a
# finished study plans these jobs and the report only. One MLflow run per job, nested under
# the cell's run. Code: finetail.posthoc (posthoc_job.py is what `finetail posthoc` runs).
# cRT (classifier re-training, Kang et al. 2020) trains a new head on the cell's frozen
# backbone: a training job (rule crt below, `finetail train --init-model <cell>/model.pt`).
# A researcher's own correction (method plugin, finetail.plugins) is rule posthoc_plugin: the
# same job, the plugin's code digest in its params.


rule posthoc:
    wildcard_constraints:
        method=alternation(ADJUST) if ADJUST else "^$",
    input:
        manifest=get_longtail_manifest,
        model=L.train("cbloss", "model.pt", dataset="{dataset}", imbalance="{imbalance}", loss="{loss}", seed="{seed}"),
        cell=L.train("cbloss", dataset="{dataset}", imbalance="{imbalance}", loss="{loss}", seed="{seed}"),
    output:
        metrics=L.train("posthoc", **POSTHOC_WILDCARDS),
        per_class=L.train("posthoc", "per_class.csv", **POSTHOC_WILDCARDS),
    params:
        code=code("posthoc"),
        method=lambda wildcards: POSTHOC[wildcards.method]["method"],
        tau=lambda wildcards: POSTHOC[wildcards.method]["tau"],
        wildcards=get_wildcards_json,
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        study_dir=lambda wildcards: L.root,
        experiment=EXPERIMENT,
        tracking=TRACKING_ARGS,
    conda:
        "../../envs/finetail.yaml"
    log:
        L.train_log("posthoc", **POSTHOC_WILDCARDS),
    threads: 1
    priority: 0
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "finetail posthoc --manifest {input.manifest:q} --model {input.model:q} --cell-metrics {input.cell:q} "
        "--method {params.method:q} --tau {params.tau:q} --out-dir {params.out_dir:q} --study-dir {params.study_dir:q} "
        "--rule posthoc --wildcards {params.wildcards:q} --experiment {params.experiment:q} {params.tracking:q} "
        "--threads {threads:q} > {log:q} 2>&1"


rule posthoc_plugin:
    wildcard_constraints:
        method=alternation(PLUGIN_POSTHOC) if PLUGIN_POSTHOC else "^$",
    input:
        manifest=get_longtail_manifest,
        model=L.train("cbloss", "model.pt", dataset="{dataset}", imbalance="{imbalance}", loss="{loss}", seed="{seed}"),
        cell=L.train("cbloss", dataset="{dataset}", imbalance="{imbalance}", loss="{loss}", seed="{seed}"),
    output:
        metrics=L.train("posthoc", **POSTHOC_WILDCARDS),
        per_class=L.train("posthoc", "per_class.csv", **POSTHOC_WILDCARDS),
    params:
        code=lambda wildcards: code_with_plugins("posthoc", [("posthoc", POSTHOC[wildcards.method]["plugin"])]),
        plugin=lambda wildcards: POSTHOC[wildcards.method]["plugin"],
        plugin_params=lambda wildcards: as_json(POSTHOC[wildcards.method].get("params", {})),
        wildcards=get_wildcards_json,
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        study_dir=lambda wildcards: L.root,
        experiment=EXPERIMENT,
        tracking=TRACKING_ARGS,
    conda:
        "../../envs/finetail.yaml"
    log:
        L.train_log("posthoc", **POSTHOC_WILDCARDS),
    threads: 1
    priority: 0
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "finetail posthoc --manifest {input.manifest:q} --model {input.model:q} --cell-metrics {input.cell:q} "
        "--method plugin --plugin {params.plugin:q} --plugin-params {params.plugin_params:q} "
        "--out-dir {params.out_dir:q} --study-dir {params.study_dir:q} --rule posthoc --wildcards {params.wildcards:q} "
        "--experiment {params.experiment:q} {params.tracking:q} --threads {threads:q} > {log:q} 2>&1"


use rule cbloss as crt with:
    wildcard_constraints:
        method=alternation(CRT) if CRT else "^$",
    input:
        manifest=get_longtail_manifest,
        init=L.train("cbloss", "model.pt", dataset="{dataset}", imbalance="{imbalance}", loss="{loss}", seed="{seed}"),
    output:
        **training_outputs("posthoc", "dataset", "imbalance", "loss", "method", "seed"),
    params:
        **training_params(
            "posthoc", get_crt_spec, init=lambda wildcards, input: ["--init-model", input.init]
        ),
    log:
        training_log("posthoc", "dataset", "imbalance", "loss", "method", "seed"),
    priority: 0
    resources:
        gpu=1,
        mem_mb=3000,
        runtime=60,
