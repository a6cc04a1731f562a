from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/dataset.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/inspect.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/probes.smk"


report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        all_targets(),
