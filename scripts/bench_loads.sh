#!/usr/bin/env bash
# Model loads of the demo's extraction with extraction.reuse_loaded_model true and false, in two fresh working
# folders under /tmp: per model its shard jobs, the loads their logs record ("loading model"), the seconds
# those loads took ("loaded in"), and the shard jobs' seconds (Snakemake's benchmark files); then the run's
# wall time to the merged files (tiny checkpoints and dataset included). Run from an environment with the
# workflow installed (pip install -e ".[workflow]"):
#
#     bash scripts/bench_loads.sh
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
echo "| reuse_loaded_model | model | shard jobs | loads | load s | job s |"
echo "|---|---|---|---|---|---|"
for reuse in true false; do
  d=$(mktemp -d /tmp/loads-$reuse-XXXX); mkdir -p $d/config
  python - "$REPO/config/config.yaml" "$d/config/config.yaml" $reuse <<'PY'
import sys, yaml
c = yaml.safe_load(open(sys.argv[1])); c["extraction"]["reuse_loaded_model"] = sys.argv[3] == "true"
yaml.safe_dump(c, open(sys.argv[2], "w"))
PY
  start=$(date +%s.%N)
  snakemake -s $REPO/Snakefile -d $d --cores 2 results/tiny-qwen2_5_vl/embeddings.h5 results/tiny-gemma3/embeddings.h5 results/tiny-phi4_multimodal/embeddings.h5 > $d/out.txt 2>&1
  end=$(date +%s.%N)
  python - $d $reuse $start $end <<'PY'
import sys, re, pathlib, pandas as pd
d = pathlib.Path(sys.argv[1]); reuse = sys.argv[2]; wall = float(sys.argv[4]) - float(sys.argv[3])
for model in sorted(p.name for p in (d / "logs" / "extract").iterdir()):
    logs = [p.read_text() for p in (d / "logs" / "extract" / model).glob("shard_*.log")]
    loads = sum(t.count("loading model ") for t in logs)
    load_s = sum(float(x) for t in logs for x in re.findall(r"loaded in ([0-9.]+) s", t))
    job_s = sum(pd.read_csv(p, sep="\t")["s"].iloc[0] for p in (d / "benchmarks" / "extract" / model).glob("shard_*.tsv"))
    print(f"| {reuse} | {model} | {len(logs)} | {loads} | {load_s:.1f} | {job_s:.1f} |")
print(f"wall (whole run to merge, incl. tiny checkpoints and dataset) reuse={reuse}: {wall:.0f} s")
PY
done
