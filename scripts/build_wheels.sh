#!/usr/bin/env bash
# Wheels of the pinned transformers and of this project, for a machine that reaches no package registry
# (a lent GPU machine with its own torch): carry the folder there and install with --no-deps --no-index.
#
#   scripts/build_wheels.sh [FOLDER]          # default: wheels/ (git-ignored by the caller's choice)
#
# Only these two: the machine keeps its own torch, and transformers' other dependencies (tokenizers,
# huggingface-hub, safetensors) must already be there in versions the pinned transformers accepts; add
# their wheels by naming them after the folder, e.g. scripts/build_wheels.sh wheels tokenizers huggingface-hub.
set -euo pipefail
cd "$(dirname "$0")/.."
folder="${1:-wheels}"
shift || true
pin() { grep -i "^$1==" constraints.txt | head -n 1; }
transformers="$(pin transformers)"
[ -n "$transformers" ] || { echo "no transformers pin in constraints.txt" >&2; exit 1; }
extra=()
for name in "$@"; do
  pinned="$(pin "$name")"
  [ -n "$pinned" ] || { echo "no pin for $name in constraints.txt" >&2; exit 1; }
  extra+=("$pinned")
done
mkdir -p "$folder"
[ -e build ] && had_build=1 || had_build=0
python -m pip wheel --no-deps --wheel-dir "$folder" "$transformers" "${extra[@]}" .
[ "$had_build" = 1 ] || rm -rf build  # setuptools' scratch folder, left in the tree otherwise
ls -l "$folder"
