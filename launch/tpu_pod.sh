#!/usr/bin/env bash
# Create a TPU VM slice (or several), ship this working tree to every worker and install it, run a
# config on all of them in the background, read their logs, stop it, delete it.
# Needs: gcloud (authenticated, a project with TPU quota) and this checkout. jax.distributed
# starts itself on TPU VMs. Usage:
#   TPU_NAME=mt ZONE=us-central2-b ACCELERATOR=v4-16 launch/tpu_pod.sh create --wait
#   TPU_NAME=mt ZONE=us-central2-b launch/tpu_pod.sh wait      # until ACTIVE/READY (or FAILED: exit 1)
#   TPU_NAME=mt ZONE=us-central2-b launch/tpu_pod.sh install
#   TPU_NAME=mt ZONE=us-central2-b launch/tpu_pod.sh run --config configs/demo.py --workdir gs://bucket/runs/x
#   TPU_NAME=mt ZONE=us-central2-b launch/tpu_pod.sh logs      # last LINES (50) lines of every worker
#   TPU_NAME=mt ZONE=us-central2-b launch/tpu_pod.sh stop      # SIGTERM: mtjax saves and exits 3
#   TPU_NAME=mt ZONE=us-central2-b launch/tpu_pod.sh delete
#   DRY_RUN=1 ... prints the gcloud commands instead of running them.
# Set the same TPU_NAME/ZONE/SLICES/QUEUED for every action (PROJECT=p adds --project p;
# INTERNAL_IP=1 adds --internal-ip and IAP=1 --tunnel-through-iap to ssh/scp, for projects whose
# VMs have no external IP).
#
# ACCELERATOR: a Cloud TPU accelerator type, v2-N, v3-N, v4-N, v5litepod-N, v5p-N or v6e-N
# (checked before any gcloud call; "v5e-N" is not one: v5e is v5litepod-N). The runtime image
# follows it (v2/v3/v4 -> tpu-ubuntu2204-base, v5litepod -> v2-alpha-tpuv5-lite, v5p ->
# v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e: Cloud TPU's "TPU VM images" page); VERSION=... overrides
# the image. `create` returns once the request is accepted; `create --wait` (or `wait`) polls
# `describe` every WAIT_POLL (30) s until the slice is ACTIVE (queued) / READY, and exits 1 on
# FAILED or SUSPENDED or after WAIT_TIMEOUT (7200) s.
# install: packs this checkout's working tree (tracked files as they are now, uncommitted edits
# included, plus untracked files git does not ignore; SRC_REF=<git ref> packs that commit instead)
# into a tarball, copies it to every worker with `gcloud ... scp --worker=all` (MaxText's
# multihost_runner does the same: no repository URL, no credentials on the workers), unpacks it
# into ~/$REMOTE_DIR (keeping its .venv), and installs `.[tpu,gcs]` (gcs: a gs:// --workdir, the
# only kind every host of a multi-host slice shares). The TPU images ship Python 3.10 and mtjax
# needs 3.11+, so `install` gets uv and makes ~/$REMOTE_DIR/.venv with `uv venv --python
# $PYTHON_VERSION` (uv downloads a standalone CPython).
# run: on every worker, stops a previous mtjax (SIGTERM, then SIGKILL after STOP_TIMEOUT s), frees
# the TPU from any other holder (the processes that have /dev/accel* or, v5e and later,
# /dev/vfio/* open: MaxText kills them the same way), removes a stale /tmp/libtpu_lockfile (left
# by a killed process, it makes the next start fail with "TPU in use"), then starts `nohup mtjax
# train ... --config.train.platform=tpu > ~/$LOG_DIR/train-<host>.log 2>&1 &` and returns; the
# process outlives the ssh session. Running `run` again with the same --workdir resumes from the
# latest checkpoint. `stop` does the same stopping and freeing.
# Several slices (multi-slice over DCN): SLICES=N creates them as one queued resource
# (`gcloud compute tpus queued-resources create ... --node-count N`; multi-slice needs queued
# resources), reaches every worker of every slice with `queued-resources ssh/scp --node=all
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
SRC_DIR=${SRC_DIR:-$(cd "$(dirname "$0")/.." && pwd)}  # the checkout that `install` ships
WAIT_POLL=${WAIT_POLL:-30}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-7200}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
STOP_TIMEOUT=${STOP_TIMEOUT:-120}
LINES=${LINES:-50}
REMOTE_DIR=${REMOTE_DIR:-mtjax}          # the checkout, under each worker's home
LOG_DIR=${LOG_DIR:-mtjax-logs}           # per-worker logs, under each worker's home
LIBTPU_LOCKFILE=${LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}

if ! [[ "$ACCELERATOR" =~ ^(v2|v3|v4|v5litepod|v5p|v6e)-[1-9][0-9]*$ ]]; then
  hint=""
  [[ "$ACCELERATOR" =~ ^v5e-([0-9]+)$ ]] && hint=" (v5e's accelerator type is v5litepod-${BASH_REMATCH[1]})"
  echo "error: ACCELERATOR=$ACCELERATOR: expected v2-N, v3-N, v4-N, v5litepod-N, v5p-N or v6e-N$hint" >&2
  exit 2
fi
runtime_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
  esac
}
VERSION=${VERSION:-$(runtime_version "$ACCELERATOR")}
if ! [[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]]; then
  echo "error: REMOTE_DIR=$REMOTE_DIR: expected a directory name under the workers' home" >&2
  exit 2
fi
if [[ -n "${INTERNAL_IP:-}" && -n "${IAP:-}" ]]; then
  echo "error: INTERNAL_IP and IAP: set one (gcloud takes --internal-ip or --tunnel-through-iap)" >&2
  exit 2
fi
if ((SLICES > 1)) && [[ "$QUEUED" == 0 ]]; then
  echo "error: SLICES=$SLICES needs a queued resource (QUEUED=1)" >&2
  exit 2
fi

project=(${PROJECT:+--project "$PROJECT"})
access=(${INTERNAL_IP:+--internal-ip} ${IAP:+--tunnel-through-iap})
run() { if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
# Every worker of every slice: `ssh_all COMMAND`, `scp_all FILE` (into each worker's home).
on_all() {
  local verb=$1; shift
  if [[ "$QUEUED" != 0 ]]; then
    run gcloud compute tpus queued-resources "$verb" "$@" --zone "$ZONE" "${project[@]}" \
      "${access[@]}" --node=all --worker=all
  else
    run gcloud compute tpus tpu-vm "$verb" "$@" --zone "$ZONE" "${project[@]}" "${access[@]}" \
      --worker=all
  fi
}
ssh_all() { on_all ssh "$TPU_NAME" --command "$1"; }
scp_all() { on_all scp "$1" "$TPU_NAME:"; }

# The slice's state until it is usable: ACTIVE (queued resource) / READY (TPU VM).
wait_ready() {
  local describe
  if [[ "$QUEUED" != 0 ]]; then
    describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" --zone "$ZONE"
              "${project[@]}" --format="value(state.state)")
  else
    describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" "${project[@]}"
              --format="value(state)")
  fi
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '# every %ss until ACTIVE or READY: ' "$WAIT_POLL"; printf '%q ' "${describe[@]}"; echo
    return 0
  fi
  local start=$SECONDS state
  while true; do
    state=$("${describe[@]}" 2>/dev/null || echo UNKNOWN)
    case "$state" in
      ACTIVE | READY) echo "$TPU_NAME: $state"; return 0 ;;
      FAILED | SUSPENDED | SUSPENDING) echo "error: $TPU_NAME: $state" >&2; return 1 ;;
    esac
    if ((SECONDS - start >= WAIT_TIMEOUT)); then
      echo "error: $TPU_NAME still ${state:-UNKNOWN} after ${WAIT_TIMEOUT}s" >&2
      return 1
    fi
    echo "$TPU_NAME: ${state:-UNKNOWN}, waiting" >&2
    sleep "$WAIT_POLL"
  done
}

# This checkout as a tarball (tracked files as they are in the working tree, untracked ones git
# does not ignore; SRC_REF: that commit), printed path.
pack() {
  local out
  out="$(mktemp -d)/mtjax-src.tar.gz"
  if [[ -n "${SRC_REF:-}" ]]; then
    git -C "$SRC_DIR" archive --format=tar.gz -o "$out" "$SRC_REF"
  else
    (cd "$SRC_DIR" && git ls-files -z --cached --others --exclude-standard \
       | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
       | tar --null -T - -czf "$out")
  fi
  echo "$out"
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
# Whatever else holds the TPU's device files (a notebook, a killed job's orphan).
free_remote="holders=\$( (sudo -n lsof -w -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null) | sort -u | grep -vx \$\$); [ -z \"\$holders\" ] || sudo -n kill -9 \$holders 2>/dev/null || true"

case "${1:?usage: tpu_pod.sh create [--wait]|wait|install|run|logs|stop|delete [mtjax train args]}" in
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
    fi
    if [[ "${2:-}" == --wait ]]; then wait_ready; fi ;;
  wait) wait_ready ;;
  install)
    tarball=$(pack)
    scp_all "$tarball"
    [[ -n "${DRY_RUN:-}" ]] || rm -rf "$(dirname "$tarball")"  # a dry run keeps it to inspect
    ssh_all "set -e; command -v uv >/dev/null || [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; export PATH=\$HOME/.local/bin:\$PATH; mkdir -p $REMOTE_DIR; find $REMOTE_DIR -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +; tar -xzf mtjax-src.tar.gz -C $REMOTE_DIR; rm -f mtjax-src.tar.gz; cd $REMOTE_DIR; .venv/bin/python -c 'import sys; assert sys.version_info >= (${PYTHON_VERSION/./, })' 2>/dev/null || { rm -rf .venv; uv venv --python $PYTHON_VERSION .venv; }; uv pip install --python .venv/bin/python -e '.[tpu,gcs]'" ;;
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
    ssh_all "cd ~/$REMOTE_DIR || exit 1; $stop_remote; $free_remote; $unlock_remote; mkdir -p ~/$LOG_DIR; trainer=\$HOME/$REMOTE_DIR/.venv/bin/mtjax; setsid nohup \$trainer train $(printf '%q ' "${args[@]}")> $log 2>&1 < /dev/null & echo \"\$(hostname): mtjax started (pid \$!), log $log\"" ;;
  logs) ssh_all "echo \"== \$(hostname)\"; tail -n $LINES $log" ;;
  stop) ssh_all "$stop_remote; $free_remote; $unlock_remote; echo \"\$(hostname): mtjax stopped\"" ;;
  delete)
    if [[ "$QUEUED" != 0 ]]; then
      run gcloud compute tpus queued-resources delete "$TPU_NAME" --zone "$ZONE" "${project[@]}" \
        --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" "${project[@]}" --quiet
    fi ;;
  *) echo "unknown action $1 (create|wait|install|run|logs|stop|delete)" >&2; exit 2 ;;
esac
