from snakemake.utils import min_version

min_version("9.0")


# The bundled demo's config, unless the run names its own with --configfile: a user's config then stands
# alone instead of being merged into the demo's (its models, data and labels file). --config alone still
# changes single demo keys.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/dataset.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/inspect.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/labels.smk"
include: "workflow/rules/probes.smk"
include: "workflow/rules/screen.smk"


report: "workflow/report/workflow.rst"


# The closing lines on the terminal: per model questions ok and failed, rows dropped by validation, the
# failed steps with their logs, and what to run next (vlmstates.workflow.run_summary).
onsuccess:
    print(run_summary(config, succeeded=True))


onerror:
    print(run_summary(config, succeeded=False, started=RUN_STARTED))


rule all:
    default_target: True
    input:
        all_targets(),
