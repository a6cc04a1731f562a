rule demo_dataset:
    output:
        csv="resources/demo/questions.csv",
        images=directory("resources/demo/images"),
        # stand-in labels (vlmstates.demo.dataset): the demo config's labels.file, so rule label waits for it
        labels="resources/demo/labels.csv",
    log:
        "logs/demo_dataset.log",
    retries: 0  # deterministic: a retry repeats the same error
    conda:
        "../../envs/core.yaml"
    params:
        cli=VLMSTATES,
    shell:
        "{params.cli} demo resources/demo > {log:q} 2>&1"


rule tiny_checkpoint:
    output:
        directory("resources/checkpoints/tiny-{family}"),
    log:
        "logs/tiny_checkpoint/{family}.log",
    retries: 0  # deterministic: a retry repeats the same error
    conda:
        "../../envs/{family}.yaml"
    params:
        cli=VLMSTATES,
    shell:
        "{params.cli} tiny {wildcards.family} {output:q} > {log:q} 2>&1"
