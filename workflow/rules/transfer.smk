# Transfer: pool each source's datasets, pretrain one network per source, fine-tune every
# source (and, as the baseline, random weights: "scratch") on every target.


rule pool_source:
    input:
        unpack(get_source_inputs),
    output:
        manifest=f"{RESULTS}/sources/{{source}}/manifest.parquet",
        classes=f"{RESULTS}/sources/{{source}}/classes.csv",
    params:
        classes=lambda wildcards, input: cli_option("--classes", input.classes if "classes" in input.keys() else None),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    conda:
        "../../envs/finetail.yaml"
    log:
        f"{LOGS}/pool_source/{{source}}.log",
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "finetail pool --inputs {input.manifests:q} {params.classes:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule pretrain:
    input:
        manifest=f"{RESULTS}/sources/{{source}}/manifest.parquet",
    output:
        model=f"{RESULTS}/pretrain/{{source}}/model.pt",
        metrics=f"{RESULTS}/pretrain/{{source}}/metrics.json",
        per_class=f"{RESULTS}/pretrain/{{source}}/per_class.csv",
        history=f"{RESULTS}/pretrain/{{source}}/history.csv",
    params:
        code=CODE["train"],
        spec=get_pretrain_spec,
        wildcards=get_wildcards_json,
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        checkpoint=f"{RESULTS}/checkpoints/pretrain/{{source}}/last.pt",
        study_dir=lambda wildcards, output: str(Path(output.metrics).parents[2]),
        experiment=EXPERIMENT,
        tracking=TRACKING_ARGS,
    conda:
        "../../envs/finetail.yaml"
    log:
        f"{LOGS}/pretrain/{{source}}.log",
    threads: 1
    resources:
        gpu=1,  # one GPU where there is one (Slurm: --gpus; locally: --resources gpu=N tokens)
        mem_mb=4000,
        runtime=720,
    shell:
        "finetail train --manifest {input.manifest:q} --spec {params.spec:q} --save-model {output.model:q} "
        "--out-dir {params.out_dir:q} --checkpoint {params.checkpoint:q} --study-dir {params.study_dir:q} "
        "--rule pretrain --wildcards {params.wildcards:q} --experiment {params.experiment:q} "
        "{params.tracking:q} --threads {threads:q} --nproc {resources.gpu:q} > {log:q} 2>&1"


rule finetune:
    input:
        manifest=f"{RESULTS}/datasets/{{target}}/manifest.parquet",
        init=get_finetune_init,
    output:
        metrics=f"{RESULTS}/finetune/{{source}}/{{target}}/metrics.json",
        per_class=f"{RESULTS}/finetune/{{source}}/{{target}}/per_class.csv",
        history=f"{RESULTS}/finetune/{{source}}/{{target}}/history.csv",
    params:
        code=CODE["train"],
        spec=get_finetune_spec,
        wildcards=get_wildcards_json,
        init=lambda wildcards, input: cli_option("--init-model", input.init[0] if input.init else None),
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        checkpoint=f"{RESULTS}/checkpoints/finetune/{{source}}/{{target}}/last.pt",
        study_dir=lambda wildcards, output: str(Path(output.metrics).parents[3]),
        experiment=EXPERIMENT,
        tracking=TRACKING_ARGS,
    conda:
        "../../envs/finetail.yaml"
    log:
        f"{LOGS}/finetune/{{source}}/{{target}}.log",
    threads: 1
    resources:
        gpu=1,  # one GPU where there is one (Slurm: --gpus; locally: --resources gpu=N tokens)
        mem_mb=3000,
        runtime=240,
    shell:
        "finetail train --manifest {input.manifest:q} --spec {params.spec:q} {params.init:q} "
        "--out-dir {params.out_dir:q} --checkpoint {params.checkpoint:q} --study-dir {params.study_dir:q} "
        "--rule finetune --wildcards {params.wildcards:q} --experiment {params.experiment:q} "
        "{params.tracking:q} --threads {threads:q} --nproc {resources.gpu:q} > {log:q} 2>&1"
