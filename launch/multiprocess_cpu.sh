#!/usr/bin/env bash
# N mtjax processes on this machine with CPU collectives (gloo): a real multi-process run, for
# testing. Each process gets 8/N fake CPU devices unless DEVICES_PER_PROCESS is set.
#   launch/multiprocess_cpu.sh 2 --config configs/demo.py:tiny --workdir /tmp/mp
#   DRY_RUN=1 launch/multiprocess_cpu.sh 2 ...    # print the commands only
# SIGTERM/SIGINT to this script go to every process; it exits 0 if all did, else with the first
# nonzero code (3: preempted and saved), naming each process that failed on stderr.
set -euo pipefail
n=${1:?usage: multiprocess_cpu.sh N [mtjax train args...]}
shift
per=${DEVICES_PER_PROCESS:-$((8 / n))}
port=${PORT:-$((20000 + RANDOM % 20000))}
mtjax=${MTJAX:-mtjax}
pids=()
for ((i = 0; i < n; i++)); do
  cmd=(env XLA_FLAGS="--xla_force_host_platform_device_count=$per" JAX_PLATFORMS=cpu
       $mtjax train "$@" --coordinator "127.0.0.1:$port" --num_processes "$n" --process_id "$i")
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "${cmd[@]}"; echo; continue; fi
  "${cmd[@]}" &
  pids+=($!)
done
# Signals to this script go to every process (each stops at the same step, saves, exits 3).
forward() { interrupted=1; kill -s "$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
status=0
for i in "${!pids[@]}"; do
  rc=
  while :; do  # a trapped signal cuts `wait` short (code > 128): wait again for the real code
    interrupted=0 code=0
    wait "${pids[$i]}" || code=$?
    [[ $code == 127 && -n $rc ]] && break  # collected already (a signal came right after)
    rc=$code
    (( interrupted )) || break
  done
  if (( rc != 0 )); then
    echo "multiprocess_cpu.sh: process $i (pid ${pids[$i]}) exited with code $rc" >&2
    (( status != 0 )) || status=$rc
  fi
done
exit $status
