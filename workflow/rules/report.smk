# The report: tables and figures from every metrics.json, with the papers' numbers beside ours.


rule report:
    input:
        cbloss=get_cbloss_metrics(),
        cbloss_natural=get_cbloss_natural_metrics(),
        finetune=get_transfer_metrics(),
        pretrain=expand(f"{RESULTS}/pretrain/{{source}}/metrics.json", source=ALL_SOURCES),
        similarity=[f"{RESULTS}/similarity/{FMODEL_TAG}/matrix.csv"] if TR else [],
        selection=[f"{RESULTS}/selection/{SELECTED}/classes.csv"] if SELECTED else [],
    output:
        summary=f"{RESULTS}/report/summary.md",
    params:
        code=CODE["report"],
        spec=as_json(
            {
                "cbloss": CB,
                "cbloss_natural": NAT,
                "transfer": TR,
                "feature_model": FMODEL_TAG,
                "sources": ALL_SOURCES,
                "selected": SELECTED,
                "datasets": config["datasets"],
                "study": STUDY,
            }
        ),
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
        results=lambda wildcards, output: str(Path(output.summary).parents[1]),
    conda:
        "../../envs/finetail.yaml"
    log:
        f"{LOGS}/report/report.log",
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "finetail report --results {params.results:q} --spec {params.spec:q} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"
