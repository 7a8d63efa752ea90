#!/usr/bin/env bash
# N processes of one srpo_jax run on this machine, joined through jax.distributed with CPU collectives over gloo
# (srpo_jax.distributed): what the multi-process tests do, and a way to try a multi-node layout without a cluster.
#
#   launch/local.sh NPROC DEVICES_PER_PROC PYTHON_ARGS...
#
#   launch/local.sh 2 4 launch/check_mesh.py --config=configs/tiny.py --mesh=configs/mesh/nodes.py:2 --mesh.fsdp=4
#   launch/local.sh 2 4 -m srpo_jax.main --config=configs/tiny.py --mesh=configs/mesh/nodes.py:2 --mesh.fsdp=4
#
# (The second line trains across the processes: each samples its share of a step's prompts on its own devices, the
# update runs over all of them, process 0 writes the run's files: BUILD_NOTES.md, "Multi-process runs".)
#
# Process i (0 <= i < NPROC) runs `$PYTHON PYTHON_ARGS... <mesh flags>` from the repository root with
# JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_PROC, where the mesh flags are
# --config.mesh.coordinator=127.0.0.1:PORT --config.mesh.process_id=i and the process count: --mesh.num_processes=N
# when a --mesh layout is given (the layout is applied over the config, so it must carry the count), else
# --config.mesh.num_processes=N. PYTHON_ARGS must therefore be an entry point that takes srpo_jax.main's flags
# (srpo_jax.main, srpo_jax.plan is single-process, launch/check_mesh.py).
#
# Output lines are prefixed "[pI] ". When a process exits non-zero the others are killed (a peer left alone would wait
# in a collective) and the script exits with that status; the whole run is bounded by TIMEOUT seconds.
#
# Environment: PYTHON (default: .venv/bin/python when it exists, else python), PORT (coordinator port; default a free
# one), TIMEOUT (default 3600 s; exit 124 when it runs out).
set -euo pipefail

if [[ $# -lt 3 || ! "$1" =~ ^[1-9][0-9]*$ || ! "$2" =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,25p' "$0" >&2
  exit 2
fi
NPROC="$1"; DEVICES="$2"; shift 2

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=python; fi
PORT="${PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
TIMEOUT="${TIMEOUT:-3600}"

count_flag="--config.mesh.num_processes=$NPROC"
for arg in "$@"; do
  if [[ "$arg" == --mesh=* ]]; then count_flag="--mesh.num_processes=$NPROC"; fi
done

export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap 'cleanup; exit 130' INT TERM

echo "local.sh: $NPROC processes x $DEVICES CPU devices, coordinator 127.0.0.1:$PORT" >&2
for ((i = 0; i < NPROC; i++)); do
  timeout --kill-after=10 "$TIMEOUT" "$PY" "$@" "$count_flag" "--config.mesh.coordinator=127.0.0.1:$PORT" \
    "--config.mesh.process_id=$i" > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  pids+=("$!")
done

# The first process to fail stops the rest; otherwise wait for all (polling: portable to bash without `wait -p`).
status=0
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  next=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then next+=("$pid"); continue; fi
    rc=0
    wait "$pid" || rc=$?
    if ((rc)); then
      status=$rc
      echo "local.sh: process with pid $pid exited with status $rc; stopping the others" >&2
      cleanup
      next=()
      break
    fi
  done
  remaining=("${next[@]}")
  sleep 0.5
done
wait 2>/dev/null || true
exit "$status"
