# Training: one job (and one MLflow run) per result folder of finetail.layout.TRAINING.
# The class-balanced loss grid (cbloss: dataset x imbalance factor x loss; cbloss_natural:
# naturally long-tailed dataset x model x loss), pretraining on each transfer source and
# fine-tuning every source (and "scratch", random weights) on every target are the same
# job with other inputs and specs: one rule, and three uses of it.
# Code: finetail.training (job.py is what `finetail train` runs).


rule cbloss:
    input:
        manifest=get_longtail_manifest,
    output:
        # model.pt: what a post-hoc correction (posthoc.smk) reads, so adding one retrains nothing
        **training_outputs("cbloss", "dataset", "imbalance", "loss", "seed", model=True),
    params:
        **training_params(
            "cbloss", get_cbloss_spec, save_model=lambda wildcards, output: ["--save-model", output.model]
        ),
    conda:
        "../../envs/finetail.yaml"
    log:
        training_log("cbloss", "dataset", "imbalance", "loss", "seed"),
    threads: 1
    # Scheduling on few cores: the transfer chain (feature network -> features -> selection ->
    # pretrain -> fine-tune) first, the independent long-tail cells fill the gaps (higher first).
    priority: 0
    resources:
        gpu=1,  # one GPU where there is one (Slurm: --gpus; locally: --resources gpu=N tokens)
        mem_mb=3000,
        runtime=240,
    shell:
        "finetail train --manifest {input.manifest:q} --spec {params.spec:q} {params.init:q} {params.save_model:q} "
        "--out-dir {params.out_dir:q} --checkpoint {params.checkpoint:q} --study-dir {params.study_dir:q} "
        "--rule {params.stage:q} --wildcards {params.wildcards:q} --experiment {params.experiment:q} "
        "{params.tracking:q} --threads {threads:q} --nproc {resources.gpu:q} > {log:q} 2>&1"


use rule cbloss as cbloss_natural with:
    input:
        manifest=lambda wildcards: dataset_manifest(wildcards.dataset, int(wildcards.seed)),
    output:
        **training_outputs("cbloss_natural", "dataset", "model", "loss", "seed"),
    params:
        **training_params("cbloss_natural", get_cbloss_natural_spec),
    log:
        training_log("cbloss_natural", "dataset", "model", "loss", "seed"),
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=4320,


use rule cbloss as pretrain with:
    wildcard_constraints:
        source=alternation(ALL_SOURCES) if TR else "^$",
    input:
        manifest=get_pretrain_manifest,
    output:
        **training_outputs("pretrain", "source", "seed", model=True),
    params:
        **training_params(
            "pretrain", get_pretrain_spec, save_model=lambda wildcards, output: ["--save-model", output.model]
        ),
    log:
        training_log("pretrain", "source", "seed"),
    priority: 2
    resources:
        gpu=1,
        mem_mb=4000,
        runtime=720,


# The feature network (transfer.features.networks, e.g. probe) is pretrained like a source,
# but heads the transfer half's critical path (features -> selection -> the selected source's
# pretraining -> its fine-tunes): its own rule, so it runs before the ranked sources' pretraining.
use rule pretrain as feature_network with:
    wildcard_constraints:
        source=alternation(FEATURE_NETWORKS) if FEATURE_NETWORKS else "^$",
    priority: 3


use rule cbloss as finetune with:
    input:
        manifest=get_target_manifest,
        init=get_finetune_init,
    output:
        **training_outputs("finetune", "source", "target", "seed"),
    params:
        **training_params(
            "finetune",
            get_finetune_spec,
            init=lambda wildcards, input: cli_option("--init-model", input.init[0] if input.init else None),
        ),
    log:
        training_log("finetune", "source", "target", "seed"),
    priority: 1
