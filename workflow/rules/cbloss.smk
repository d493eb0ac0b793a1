# The class-balanced loss grid: one training job (and one MLflow run) per
# dataset x imbalance factor x loss setting.


rule cbloss:
    input:
        manifest=f"{RESULTS}/longtail/{{dataset}}_if{{imbalance}}/manifest.parquet",
    output:
        metrics=f"{RESULTS}/cbloss/{{dataset}}/if{{imbalance}}/{{loss}}/metrics.json",
        per_class=f"{RESULTS}/cbloss/{{dataset}}/if{{imbalance}}/{{loss}}/per_class.csv",
        history=f"{RESULTS}/cbloss/{{dataset}}/if{{imbalance}}/{{loss}}/history.csv",
    params:
        code=CODE["train"],
        spec=get_cbloss_spec,
        wildcards=get_wildcards_json,
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        checkpoint=f"{RESULTS}/checkpoints/cbloss/{{dataset}}/if{{imbalance}}/{{loss}}/last.pt",
        study_dir=lambda wildcards, output: str(Path(output.metrics).parents[4]),
        experiment=EXPERIMENT,
        tracking=TRACKING_ARGS,
    conda:
        "../../envs/finetail.yaml"
    log:
        f"{LOGS}/cbloss/{{dataset}}/if{{imbalance}}/{{loss}}.log",
    threads: 1
    resources:
        gpu=1,  # one GPU where there is one (Slurm: --gpus; locally: --resources gpu=N tokens)
        mem_mb=3000,
        runtime=240,
    shell:
        "finetail train --manifest {input.manifest:q} --spec {params.spec:q} "
        "--out-dir {params.out_dir:q} --checkpoint {params.checkpoint:q} --study-dir {params.study_dir:q} "
        "--rule cbloss --wildcards {params.wildcards:q} --experiment {params.experiment:q} "
        "{params.tracking:q} --threads {threads:q} --nproc {resources.gpu:q} > {log:q} 2>&1"


rule cbloss_natural:
    input:
        manifest=f"{RESULTS}/datasets/{{dataset}}/manifest.parquet",
    output:
        metrics=f"{RESULTS}/cbloss_natural/{{dataset}}/{{model}}/{{loss}}/metrics.json",
        per_class=f"{RESULTS}/cbloss_natural/{{dataset}}/{{model}}/{{loss}}/per_class.csv",
        history=f"{RESULTS}/cbloss_natural/{{dataset}}/{{model}}/{{loss}}/history.csv",
    params:
        code=CODE["train"],
        spec=get_cbloss_natural_spec,
        wildcards=get_wildcards_json,
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        checkpoint=f"{RESULTS}/checkpoints/cbloss_natural/{{dataset}}/{{model}}/{{loss}}/last.pt",
        study_dir=lambda wildcards, output: str(Path(output.metrics).parents[4]),
        experiment=EXPERIMENT,
        tracking=TRACKING_ARGS,
    conda:
        "../../envs/finetail.yaml"
    log:
        f"{LOGS}/cbloss_natural/{{dataset}}/{{model}}/{{loss}}.log",
    threads: 1
    resources:
        gpu=1,  # one GPU where there is one (Slurm: --gpus; locally: --resources gpu=N tokens)
        mem_mb=16000,
        runtime=4320,
    shell:
        "finetail train --manifest {input.manifest:q} --spec {params.spec:q} "
        "--out-dir {params.out_dir:q} --checkpoint {params.checkpoint:q} --study-dir {params.study_dir:q} "
        "--rule cbloss_natural --wildcards {params.wildcards:q} --experiment {params.experiment:q} "
        "{params.tracking:q} --threads {threads:q} --nproc {resources.gpu:q} > {log:q} 2>&1"
