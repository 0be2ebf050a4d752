#!/usr/bin/env bash
# Create a TPU VM slice (or several), install mtjax on every worker, run a config on all of them in
# the background, read their logs, stop it, delete it.
# Needs: gcloud (authenticated, a project with TPU quota), this repo reachable as a git URL
# (REPO_URL). jax.distributed starts itself on TPU VMs. Usage:
#   TPU_NAME=mt ZONE=us-central2-b ACCELERATOR=v4-16 launch/tpu_pod.sh create
#   TPU_NAME=mt ZONE=us-central2-b launch/tpu_pod.sh install
#   TPU_NAME=mt ZONE=us-central2-b launch/tpu_pod.sh run --config configs/demo.py --workdir gs://bucket/runs/x
#   TPU_NAME=mt ZONE=us-central2-b launch/tpu_pod.sh logs      # last LINES (50) lines of every worker
#   TPU_NAME=mt ZONE=us-central2-b launch/tpu_pod.sh stop      # SIGTERM: mtjax saves and exits 3
#   TPU_NAME=mt ZONE=us-central2-b launch/tpu_pod.sh delete
#   DRY_RUN=1 ... prints the gcloud commands instead of running them.
# Set the same TPU_NAME/ZONE/SLICES/QUEUED for every action (PROJECT=p adds --project p).
#
# Runtime image: derived from ACCELERATOR (v2/v3/v4 -> tpu-ubuntu2204-base, v5litepod/v5e ->
# v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e: Cloud TPU's "TPU VM
# images" page); VERSION=... overrides it.
# Python: the TPU images ship Python 3.10 and mtjax needs 3.11+, so `install` gets uv and makes
# ~/$REMOTE_DIR/.venv with `uv venv --python $PYTHON_VERSION` (uv downloads a standalone CPython).
# run: on every worker, stops a previous mtjax (SIGTERM, then SIGKILL after STOP_TIMEOUT s),
# removes a stale /tmp/libtpu_lockfile (left by a killed process, it makes the next start fail
# with "TPU in use"), then starts `nohup mtjax train ... > ~/$LOG_DIR/train-<host>.log 2>&1 &`
# and returns; the process outlives the ssh session. Running `run` again with the same --workdir
# resumes from the latest checkpoint.
# Several slices (multi-slice over DCN): SLICES=N creates them as one queued resource
# (`gcloud compute tpus queued-resources create ... --node-count N`; multi-slice needs queued
# resources), reaches every worker of every slice with `queued-resources ssh --node=all
# --worker=all`, and adds --config.mesh.dcn=N to `run` (unless given) so the outer data-parallel
# axis spans the slices. QUEUED=1 uses a queued resource for a single slice too (the way Cloud TPU
# recommends to wait for capacity); SPOT=1 asks for spot capacity.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-8}
SLICES=${SLICES:-1}
if ! [[ "$SLICES" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: SLICES=$SLICES: expected a positive integer" >&2
  exit 2
fi
QUEUED=${QUEUED:-$((SLICES > 1 ? 1 : 0))}
REPO_URL=${REPO_URL:-https://example.invalid/mtjax.git}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
STOP_TIMEOUT=${STOP_TIMEOUT:-120}
LINES=${LINES:-50}
REMOTE_DIR=${REMOTE_DIR:-mtjax}          # the checkout, under each worker's home
LOG_DIR=${LOG_DIR:-mtjax-logs}           # per-worker logs, under each worker's home
LIBTPU_LOCKFILE=${LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}

runtime_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}
if [[ -z "${VERSION:-}" ]] && ! VERSION=$(runtime_version "$ACCELERATOR"); then
  echo "error: ACCELERATOR=$ACCELERATOR: expected v2-N, v3-N, v4-N, v5litepod-N (v5e-N), v5p-N or" \
       "v6e-N (or set VERSION to the runtime image)" >&2
  exit 2
fi
if ((SLICES > 1)) && [[ "$QUEUED" == 0 ]]; then
  echo "error: SLICES=$SLICES needs a queued resource (QUEUED=1)" >&2
  exit 2
fi

project=(${PROJECT:+--project "$PROJECT"})
run() { if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
ssh_all() {
  if [[ "$QUEUED" != 0 ]]; then
    run gcloud compute tpus queued-resources ssh "$TPU_NAME" --zone "$ZONE" "${project[@]}" \
      --node=all --worker=all --command "$1"
  else
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project[@]}" --worker=all \
      --command "$1"
  fi
}

# Remote snippets (one line each; they run in each worker's login shell, from $HOME). mtjax runs
# by its absolute path so that the pattern below finds only this checkout's trainer; the [.]
# keeps pkill/pgrep from matching the ssh shell whose command line holds the pattern itself, and
# `run` starts "$trainer train" so that the ssh shell's own text never matches either.
pattern="'$REMOTE_DIR/[.]venv/bin/mtjax train'"
log="~/$LOG_DIR/train-\$(hostname).log"
wait_gone="for i in \$(seq $STOP_TIMEOUT); do pgrep -f $pattern >/dev/null || break; sleep 1; done"
stop_remote="pkill -TERM -f $pattern || true; $wait_gone; pkill -KILL -f $pattern || true"
unlock_remote="sudo -n rm -f $LIBTPU_LOCKFILE 2>/dev/null || rm -f $LIBTPU_LOCKFILE"

case "${1:?usage: tpu_pod.sh create|install|run|logs|stop|delete [mtjax train args]}" in
  create)
    if [[ "$QUEUED" != 0 ]]; then
      if ((SLICES > 1)); then nodes=(--node-count "$SLICES" --node-prefix "$TPU_NAME");
      else nodes=(--node-id "$TPU_NAME"); fi
      run gcloud compute tpus queued-resources create "$TPU_NAME" --zone "$ZONE" "${project[@]}" \
        --accelerator-type "$ACCELERATOR" --runtime-version "$VERSION" "${nodes[@]}" \
        ${SPOT:+--spot}
    else
      run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" "${project[@]}" \
        --accelerator-type "$ACCELERATOR" --version "$VERSION" ${SPOT:+--spot}
    fi ;;
  install)
    ssh_all "set -e; command -v uv >/dev/null || [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; export PATH=\$HOME/.local/bin:\$PATH; git clone $(printf '%q' "$REPO_URL") $REMOTE_DIR || (cd $REMOTE_DIR && git pull --ff-only); cd $REMOTE_DIR; .venv/bin/python -c 'import sys; assert sys.version_info >= (${PYTHON_VERSION/./, })' 2>/dev/null || { rm -rf .venv; uv venv --python $PYTHON_VERSION .venv; }; uv pip install --python .venv/bin/python -e '.[tpu]'" ;;
  run)
    shift
    (($#)) || { echo "usage: tpu_pod.sh run --config CONFIG --workdir DIR [--config.a.b=v ...]" >&2; exit 2; }
    args=("$@")
    if ((SLICES > 1)) && [[ " ${args[*]} " != *" --config.mesh.dcn="* ]]; then
      args+=("--config.mesh.dcn=$SLICES")
    fi
    # A worker whose TPU JAX cannot open (libtpu missing, the chips held by another process)
    # stops at start with the cause (exit 2) instead of training on its CPU.
    [[ " ${args[*]} " == *" --config.train.platform="* ]] || args+=("--config.train.platform=tpu")
    ssh_all "cd ~/$REMOTE_DIR || exit 1; $stop_remote; $unlock_remote; mkdir -p ~/$LOG_DIR; trainer=\$HOME/$REMOTE_DIR/.venv/bin/mtjax; setsid nohup \$trainer train $(printf '%q ' "${args[@]}")> $log 2>&1 < /dev/null & echo \"\$(hostname): mtjax started (pid \$!), log $log\"" ;;
  logs) ssh_all "echo \"== \$(hostname)\"; tail -n $LINES $log" ;;
  stop) ssh_all "$stop_remote; $unlock_remote; echo \"\$(hostname): mtjax stopped\"" ;;
  delete)
    if [[ "$QUEUED" != 0 ]]; then
      run gcloud compute tpus queued-resources delete "$TPU_NAME" --zone "$ZONE" "${project[@]}" \
        --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" "${project[@]}" --quiet
    fi ;;
  *) echo "unknown action $1 (create|install|run|logs|stop|delete)" >&2; exit 2 ;;
esac
