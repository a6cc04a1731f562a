# Screening a dataset with a saved probe (config key `screen`): prefill-only extraction of just the layer
# the probe reads, then per question the hallucination risk and predicted label (vlmstates.analysis.screen).
# One job: the dataset is validated, extracted as one shard and scored by `vlmstates screen --dataset`.


rule screen:
    input:
        csv=lambda wildcards: config["screen"]["csv"],
        images=lambda wildcards: config["screen"]["images"],
        probes=results_path(f"{{model}}/probes/{PROBE_OUTPUTS.saved}"),
        weights=built_weights,
    output:
        scores=results_path("{model}/screen/scores.csv"),
        # written beside the scores by `vlmstates screen` (vlmstates.analysis.screen.sidecar_path)
        metadata=results_path("{model}/screen/scores.json"),
        embeddings=results_path("{model}/screen/embeddings.h5"),
    log:
        "logs/screen/{model}.log",
    retries: 0  # deterministic: a retry repeats the same error
    conda:
        family_environment
    resources:
        gpu=1,
    params:
        cli=VLMSTATES,
        settings=settings_json,
        probe=lambda wildcards: config["screen"]["probe"],
        lenient=lambda wildcards: (
            "--lenient" if config["screen"]["validation"] == "lenient" else ""
        ),
    shell:
        "{params.cli} screen {input.probes:q} --probe {params.probe:q} --dataset {input.csv:q}"
        " --images {input.images:q} --model {params.settings:q} {params.lenient}"
        " --embeddings-out {output.embeddings:q} --output {output.scores:q} > {log:q} 2>&1"
