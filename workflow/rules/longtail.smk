# Long-tailed training subsets: manifests that point into the balanced set's store.


rule longtail:
    input:
        manifest=f"{RESULTS}/datasets/{{dataset}}/manifest.parquet",
    output:
        manifest=f"{RESULTS}/longtail/{{dataset}}_if{{imbalance}}/manifest.parquet",
        counts=f"{RESULTS}/longtail/{{dataset}}_if{{imbalance}}/counts.csv",
    params:
        code=CODE["longtail"],
        profile=config["longtail"]["profile"],
        seed=config["longtail"]["seed"],
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    conda:
        "../../envs/finetail.yaml"
    log:
        f"{LOGS}/longtail/{{dataset}}_if{{imbalance}}.log",
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "finetail longtail --input {input.manifest:q} --imbalance {wildcards.imbalance:q} "
        "--profile {params.profile:q} --seed {params.seed:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
