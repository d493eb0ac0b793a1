# The report: tables and figures from every metrics.json, with the papers' numbers beside ours;
# and what `snakemake --report report.html` shows of them (finetail.report_files: one list of
# file -> category, subcategory, caption; captions in workflow/report/).
# Code: finetail.report, finetail.report_files (lineage and audit of its numbers: finetail.provenance).
# get_report_outputs() and report_flag(): common.smk (the similarity rule marks its heatmap too).


# The report's front page: the study, its halves, and the commits its runs ran.
report: "../report/workflow.rst"


rule report:
    input:
        cbloss=get_cbloss_metrics(),
        posthoc=get_posthoc_metrics(),
        cbloss_natural=get_cbloss_natural_metrics(),
        finetune=get_transfer_metrics(),
        pretrain=get_pretrain_metrics() if TR else [],
        similarity=get_similarity_outputs(),
        selection=get_selection_outputs(SELECTED),
        random=get_selection_outputs(RANDOM),
        scores=get_scores(),
    output:
        **get_report_outputs(),
    params:
        code=code("report"),
        spec=as_json(
            {
                "cbloss": CB,
                "cbloss_natural": NAT,
                "transfer": TR,
                "feature_model": FMODEL_TAG,
                "sources": ALL_SOURCES,
                "selected": SELECTED,
                "random": RANDOM,
                "datasets": config["datasets"],
                "world": config.get("world"),
                "study": STUDY,
                "replicates": config["replicates"],
            }
        ),
        # every training run behind the report, for its provenance table
        metrics=lambda wildcards, input: [
            *input.cbloss,
            *input.posthoc,
            *input.cbloss_natural,
            *input.pretrain,
            *input.finetune,
        ],
        experiment=EXPERIMENT,
        out_dir=lambda wildcards, output: os.path.dirname(output.summary_md),
        results=lambda wildcards: L.root,
    conda:
        "../../envs/finetail.yaml"
    log:
        L.log("report", "report"),
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "finetail report --results {params.results:q} --spec {params.spec:q} "
        "--metrics {params.metrics:q} --experiment {params.experiment:q} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"
