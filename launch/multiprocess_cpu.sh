#!/usr/bin/env bash
# N mtjax processes on this machine with CPU collectives (gloo): a real multi-process run, for
# testing. Each process gets 8/N fake CPU devices unless DEVICES_PER_PROCESS is set.
#   launch/multiprocess_cpu.sh 2 --config configs/demo.py:tiny --workdir /tmp/mp
#   DRY_RUN=1 launch/multiprocess_cpu.sh 2 ...    # print the commands only
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
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
