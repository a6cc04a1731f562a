#!/usr/bin/env bash
# Installs what tests/test_slurm.py needs: Debian's SLURM (slurmctld, slurmd and the client commands) and
# MUNGE, and Snakemake's SLURM executor plugin. Idempotent: a step already done is skipped.
# Needs root for apt-get (CI is root). Starts no daemon: the test starts its own from a fresh state folder.
set -euo pipefail

PLUGIN_VERSION=2.8.0
PYTHON=$(command -v python || command -v python3)
export DEBIAN_FRONTEND=noninteractive

have_slurm() {
    local p
    for p in slurmctld slurmd slurmstepd munged mungekey sbatch squeue scontrol sinfo scancel; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "$p" >/dev/null || return 1
    done
}

if have_slurm; then
    :
elif [ "$(id -u)" -ne 0 ]; then
    echo "slurm-setup: not root, cannot install slurm-wlm and munge (tests/test_slurm.py skips without root)" >&2
else
    # The packages' maintainer scripts must not start munge/slurm services: the test starts its own,
    # and containers have no init system for them. policy-rc.d answering 101 forbids it.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

installed=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("snakemake-executor-plugin-slurm"))' 2>/dev/null || true)
if [ "$installed" != "$PLUGIN_VERSION" ]; then
    # with the pinned snakemake (-c), so the two resolve together
    "$PYTHON" -m pip install -q -c "$(dirname "$0")/../constraints.txt" snakemake "snakemake-executor-plugin-slurm==${PLUGIN_VERSION}"
fi

echo "slurm-setup: $(PATH="$PATH:/usr/sbin" slurmctld -V 2>/dev/null || echo 'no SLURM'), snakemake-executor-plugin-slurm ${PLUGIN_VERSION}"
