#!/usr/bin/env bash
# One mtjax process on this machine (CPU, one GPU, or a single TPU VM).
# Needs: `make setup` (or mtjax installed). Usage:
#   launch/local.sh --config configs/demo.py --workdir runs/demo [--config.a.b=v ...]
#   DRY_RUN=1 launch/local.sh ...     # print the command only
set -euo pipefail
mtjax=${MTJAX:-$(dirname "$0")/../.venv/bin/mtjax}
cmd=($mtjax train "$@")
if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
