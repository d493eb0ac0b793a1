# Transferability scores beside domain similarity: for every ranked source and every target,
# the source's pretrained networks (one per seed) on the target's training images, scored by
# LogME, LEEP, NCE, H-score and k-NN (transfer.transferability.scores). The report ranks them
# against the fine-tuned accuracy (Kendall τ and weighted τ per target).
# Code: finetail.scoring (the job), finetail.transferability (the scores), finetail.transfer_eval.


rule transferability:
    wildcard_constraints:
        source=alternation(ALL_SOURCES) if TR else "^$",
    input:
        manifest=L.dataset("{target}"),
        models=lambda wildcards: [L.train("pretrain", "model.pt", source=wildcards.source, seed=s) for s in TR_SEEDS],
    output:
        L.scores("{source}", "{target}"),
    params:
        code=code("transferability"),
        spec=lambda wildcards: as_json(
            {"source": wildcards.source, "target": wildcards.target, **TR["transferability"]}
        ),
        seeds=[str(s) for s in TR_SEEDS],
    conda:
        "../../envs/finetail.yaml"
    log:
        L.log("transferability", "{source}", "{target}"),
    threads: 1
    resources:
        gpu=1,  # one GPU where there is one (Slurm: --gpus; locally: --resources gpu=N tokens)
        mem_mb=3000,
        runtime=30,
    shell:
        "finetail transferability --models {input.models:q} --seeds {params.seeds:q} --manifest {input.manifest:q} "
        "--spec {params.spec:q} --out {output:q} --threads {threads:q} > {log:q} 2>&1"
