checkpoint validate_dataset:
    input:
        dataset_inputs,
    output:
        table=VALIDATED_TABLE,
    # The reports are logs so that they survive a failed (strict) validation.
    log:
        main="logs/validate_dataset.log",
        json=results_path("dataset/validation.json"),
        markdown=results_path("dataset/validation.md"),
    # a bad row stays bad: retrying (the profile's restart-times) would only print the same report twice
    retries: 0
    conda:
        "../../envs/core.yaml"
    params:
        cli=VLMSTATES,
        options=validation_options(),
        # the source's settings are a param: a changed source (or column map) validates again
        dataset=dataset_arguments(),
    shell:
        "{params.cli} validate {params.dataset} --table {output.table:q}"
        " --report-json {log.json:q} --report-md {log.markdown:q} {params.options} > {log.main:q} 2>&1"
