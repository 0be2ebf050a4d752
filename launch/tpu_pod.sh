#!/usr/bin/env bash
# Create a TPU VM slice, install mtjax on every worker, run a config on all of them, delete it.
# Needs: gcloud (authenticated, a project with TPU quota), this repo reachable as a git URL
# (REPO_URL) or copied by scp. jax.distributed starts itself on TPU VMs. Usage:
#   TPU_NAME=mt ZONE=us-central2-b ACCELERATOR=v4-16 launch/tpu_pod.sh create
#   TPU_NAME=mt ZONE=us-central2-b launch/tpu_pod.sh install
#   TPU_NAME=mt ZONE=us-central2-b launch/tpu_pod.sh run --config configs/demo.py --workdir gs://bucket/runs/x
#   TPU_NAME=mt ZONE=us-central2-b launch/tpu_pod.sh delete
#   DRY_RUN=1 ... prints the gcloud commands instead of running them.
# Several slices (multi-slice over DCN): create them as a queued resource with --node-count N,
# and pass --config.mesh.dcn=N so the outer data-parallel axis spans the slices.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-8}
VERSION=${VERSION:-tpu-ubuntu2204-base}
REPO_URL=${REPO_URL:-https://example.invalid/mtjax.git}
run() { if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
ssh_all() { run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }
case "${1:?usage: tpu_pod.sh create|install|run|delete [mtjax train args]}" in
  create) run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
            --accelerator-type "$ACCELERATOR" --version "$VERSION" ;;
  install) ssh_all "git clone $REPO_URL mtjax || (cd mtjax && git pull); cd mtjax && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'" ;;
  run) shift; ssh_all "cd mtjax && .venv/bin/mtjax train $(printf '%q ' "$@")" ;;
  delete) run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet ;;
  *) echo "unknown action $1 (create|install|run|delete)" >&2; exit 2 ;;
esac
