rule inspect_embeddings:
    input:
        results_path("{model}/embeddings.h5"),
    output:
        summary=report(
            results_path("{model}/inspection/summary.html"),
            caption="../report/inspection.rst",
            category="Embeddings",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "summary"},
        ),
        norms=report(
            results_path("{model}/inspection/norms.png"),
            caption="../report/norms.rst",
            category="Embeddings",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "vector norms"},
        ),
        json=results_path("{model}/inspection/summary.json"),
    log:
        "logs/inspect/{model}.log",
    conda:
        "../../envs/core.yaml"
    params:
        cli=VLMSTATES,
    shell:
        "{params.cli} inspect {input:q} --html {output.summary:q} --png {output.norms:q}"
        " --json {output.json:q} > {log:q} 2>&1"
