# The seed scripts' per-question layout, for analysis code written against it (config: export).
# A directory() output: the number of part files is known only once the embeddings are merged.


rule export_seed_layout:
    input:
        results_path("{model}/embeddings.h5"),
    output:
        directory(results_path("{model}/seed_layout")),
    log:
        "logs/export/{model}.log",
    retries: 0  # deterministic: a retry repeats the same error
    conda:
        "../../envs/core.yaml"
    params:
        cli=VLMSTATES,
        part_size=config["export"]["part_size"],
    shell:
        "{params.cli} export {input:q} {output:q} --prefix {wildcards.model}"
        " --part-size {params.part_size} > {log:q} 2>&1"
