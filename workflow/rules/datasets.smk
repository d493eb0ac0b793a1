# Datasets: each becomes a manifest (+ array store) in its folder of the layout
# (finetail.layout: datasets/<name>/; a generated dataset one per world, datasets/<name>/rep<k>/).
# Code: finetail.world (generate), finetail.datasets (prepare).


rule generate_world:
    wildcard_constraints:
        dataset=alternation(WORLD_SETS),
    output:
        manifest=L.dataset("{dataset}", "manifest.parquet", rep="{rep}"),
        store=L.dataset("{dataset}", "images.npy", rep="{rep}"),
        classes=L.dataset("{dataset}", "classes.csv", rep="{rep}"),
        source=L.dataset("{dataset}", "source.json", rep="{rep}"),
    params:
        code=code("generate"),
        spec=get_world_spec,
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    conda:
        "../../envs/finetail.yaml"
    log:
        L.log("generate_world", "{dataset}", "rep{rep}"),
    priority: 4  # seconds of work that every stage waits for: first (the greedy scheduler keeps to priorities)
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
        manifest=L.dataset("{dataset}", "manifest.parquet"),
        classes=L.dataset("{dataset}", "classes.csv"),
        source=L.dataset("{dataset}", "source.json"),
    params:
        code=code("prepare"),
        spec=lambda wildcards: as_json(config["datasets"][wildcards.dataset]),
        resources=config["resources_dir"],
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    conda:
        "../../envs/finetail.yaml"
    log:
        L.log("prepare_dataset", "{dataset}"),
    resources:
        mem_mb=4000,
        runtime=600,
    shell:
        "finetail prepare --dataset {wildcards.dataset:q} --spec {params.spec:q} "
        "--resources {params.resources:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
