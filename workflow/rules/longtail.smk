# Long-tailed training subsets: manifests that point into the balanced set's store.
# Code: finetail.longtail.


rule longtail:
    input:
        manifest=L.dataset("{dataset}"),
    output:
        manifest=L.longtail("{dataset}", "{imbalance}"),
        counts=L.longtail("{dataset}", "{imbalance}", "counts.csv"),
    params:
        code=code("longtail"),
        profile=config["longtail"]["profile"],
        seed=config["longtail"]["seed"],
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    conda:
        "../../envs/finetail.yaml"
    log:
        L.log("longtail", "{dataset}_if{imbalance}"),
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "finetail longtail --input {input.manifest:q} --imbalance {wildcards.imbalance:q} "
        "--profile {params.profile:q} --seed {params.seed:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
