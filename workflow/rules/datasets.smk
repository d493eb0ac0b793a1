# Datasets: each becomes a manifest (+ array store) under results/<study>/datasets/<name>/.


rule generate_world:
    wildcard_constraints:
        dataset=alternation(WORLD_SETS),
    output:
        manifest=f"{RESULTS}/datasets/{{dataset}}/manifest.parquet",
        store=f"{RESULTS}/datasets/{{dataset}}/images.npy",
        classes=f"{RESULTS}/datasets/{{dataset}}/classes.csv",
        source=f"{RESULTS}/datasets/{{dataset}}/source.json",
    params:
        code=CODE["generate"],
        spec=get_world_spec,
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    conda:
        "../../envs/finetail.yaml"
    log:
        f"{LOGS}/generate_world/{{dataset}}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "finetail generate --dataset {wildcards.dataset:q} --spec {params.spec:q} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"


rule prepare_dataset:
    wildcard_constraints:
        dataset=alternation(REAL_SETS),
    input:
        get_imagefolder_source,
    output:
        manifest=f"{RESULTS}/datasets/{{dataset}}/manifest.parquet",
        classes=f"{RESULTS}/datasets/{{dataset}}/classes.csv",
        source=f"{RESULTS}/datasets/{{dataset}}/source.json",
    params:
        code=CODE["prepare"],
        spec=lambda wildcards: as_json(config["datasets"][wildcards.dataset]),
        resources=config["resources_dir"],
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    conda:
        "../../envs/finetail.yaml"
    log:
        f"{LOGS}/prepare_dataset/{{dataset}}.log",
    resources:
        mem_mb=4000,
        runtime=600,
    shell:
        "finetail prepare --dataset {wildcards.dataset:q} --spec {params.spec:q} "
        "--resources {params.resources:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
