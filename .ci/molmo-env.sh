#!/usr/bin/env bash
# Second test environment: the Molmo adapter's tests (tests/test_molmo.py, against a stand-in for
# Molmo's remote code) under transformers 4.48.3, the version Molmo's real remote code needs
# (envs/molmo.yaml), next to the default environment's transformers 5.x; and the real remote code's
# image resizing through tensorflow under the same pins (tests/test_molmo_resize.py).
#
# A plain venv (no system site-packages) gets the whole pip part of envs/molmo.yaml, tensorflow-cpu
# included (with keras and tensorboard about 0.6 GB), plus pytest; vlmstates is taken from src/ via
# PYTHONPATH. The venv lives
# outside the work tree and is reused while envs/molmo.yaml, the python and this script's pins are
# unchanged (MOLMO_VENV_FRESH=1 rebuilds it).
#
# Usage: bash .ci/molmo-env.sh [pytest arguments]
# Env:   MOLMO_VENV (default ~/.cache/vlmstates/venv-molmo), PYTHON (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${MOLMO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/vlmstates/venv-molmo}"
PYTHON="${PYTHON:-python3}"
EXTRA_PINS=("pytest==9.0.3")

requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT
# The pip list of envs/molmo.yaml: the "- name==version" lines indented under "- pip:".
"$PYTHON" - envs/molmo.yaml >"$requirements" <<'EOF'
import re, sys
path = sys.argv[1]
pins, pip_indent = [], None
for line in open(path, encoding="utf-8"):
    if re.match(r"^\s*- pip:\s*$", line):
        pip_indent = len(line) - len(line.lstrip())
        continue
    if pip_indent is not None:
        m = re.match(r"^(\s*)- (\S+)\s*$", line)
        if not m or len(m.group(1)) <= pip_indent:
            pip_indent = None
            continue
        pins.append(m.group(2))
if not any(p.startswith("transformers==") for p in pins):
    sys.exit(f"{path}: no pinned transformers in its pip part")
print("\n".join(pins))
EOF
printf '%s\n' "${EXTRA_PINS[@]}" >>"$requirements"

# pip warns about every package missing from this machine's local index folders; keep the log readable.
pip_install() {
    "$VENV/bin/python" -m pip install --quiet --no-input "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

stamp="$({ "$PYTHON" --version; cat "$requirements"; } | sha256sum | cut -d' ' -f1)"
if [[ "${MOLMO_VENV_FRESH:-0}" == 1 || ! -f "$VENV/.molmo-stamp" || "$(cat "$VENV/.molmo-stamp")" != "$stamp" ]]; then
    started=$SECONDS
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
    pip_install pip==24.3.1
    pip_install -r "$requirements"
    echo "$stamp" >"$VENV/.molmo-stamp"
    echo "molmo venv: created $VENV in $((SECONDS - started)) s"
else
    echo "molmo venv: reusing $VENV"
fi

"$VENV/bin/python" -c 'import torch, transformers, tokenizers; print("molmo venv: transformers", transformers.__version__, "tokenizers", tokenizers.__version__, "torch", torch.__version__)'
# Two processes: tensorflow loaded before torch._dynamo (which torchvision.ops imports) segfaults in
# triton's import, so the tensorflow test never shares a process with the model tests.
PYTHONPATH="$PWD/src" "$VENV/bin/python" -m pytest tests/test_molmo.py "$@"
PYTHONPATH="$PWD/src" exec "$VENV/bin/python" -m pytest tests/test_molmo_resize.py "$@"
