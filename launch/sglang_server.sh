#!/usr/bin/env bash
# Starts an SGLang server that serves rollouts for srpo_jax (attach to it with SGLangEngine(..., url=...)).
#
#   launch/sglang_server.sh CHECKPOINT_DIR [PORT] [extra sglang.launch_server args...]
#
# CHECKPOINT_DIR is a Hugging Face directory (config.json, tokenizer, *.safetensors), e.g. Qwen/Qwen3-8B downloaded,
# or a directory the trainer exported. PORT defaults to 30000. Environment knobs:
#   TP=1               tensor-parallel GPUs per data-parallel rank (--tp-size)
#   DP=<GPUs / TP>     data-parallel ranks (--dp-size): by default every GPU of the node (nvidia-smi -L) serves
#                      rollouts; SGLang's router spreads the requests over them
#   MEM_FRACTION=0.80  GPU memory for weights + KV cache (--mem-fraction-static), a share of the memory free when the
#                      server starts. Beside the trainer on the same GPUs, started before it: `python -m
#                      srpo_jax.plan --config=... --target=...` prints the value ("a server started before the
#                      trainer: --mem-fraction-static X"), which leaves JAX its share
#   SLEEP=0            1: add --enable-memory-saver, for a trainer with rollout.sglang_sleep=true (the paper configs):
#                      the server releases its weights and KV cache while JAX trains (needs torch_memory_saver)
#   HOST=127.0.0.1     bind address (keep it local: the server has no authentication unless you pass --api-key)
#   WEIGHT_VERSION=0   the version the trainer will expect in meta_info.weight_version for these weights
#   DETERMINISTIC=1    add --enable-deterministic-inference when this SGLang has it (batch-invariant kernels; needed
#                      for per-request sampling_seed to be honoured; costs some throughput). 0 to skip.
#   SEED=0             --random-seed of the server
#   PYTHON=python      interpreter that has sglang installed
# Not verified here: this repository's CI has no GPU and no SGLang; the flags are from SGLang's server_args.py.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,23p' "$0" >&2
  exit 2
fi
CKPT="$1"; shift
PORT=30000
if [[ $# -gt 0 && "$1" != --* ]]; then PORT="$1"; shift; fi
if [[ ! -f "$CKPT/config.json" ]]; then
  echo "sglang_server.sh: $CKPT/config.json not found: CHECKPOINT_DIR must be a Hugging Face model directory" >&2
  exit 2
fi

PY="${PYTHON:-python}"
TP="${TP:-1}"
if [[ -z "${DP:-}" ]]; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  DP=$(( GPUS >= TP && GPUS > 0 ? GPUS / TP : 1 ))
fi
ARGS=(
  --model-path "$CKPT"
  --host "${HOST:-127.0.0.1}"
  --port "$PORT"
  --tp-size "$TP"
  --dp-size "$DP"
  # Sample in bf16, the dtype the trainer's weights are exported in.
  --dtype bfloat16
  --mem-fraction-static "${MEM_FRACTION:-0.80}"
  # The engine checks this tag on every answer and refuses stale rollouts; /update_weights_from_disk changes it.
  --weight-version "${WEIGHT_VERSION:-0}"
  --random-seed "${SEED:-0}"
)

if [[ "${SLEEP:-0}" == 1 ]]; then ARGS+=(--enable-memory-saver); fi

# --enable-deterministic-inference exists only in recent SGLang (0.5.x); probe instead of failing at argparse.
if [[ "${DETERMINISTIC:-1}" == 1 ]]; then
  if "$PY" -m sglang.launch_server --help 2>/dev/null | grep -q -- '--enable-deterministic-inference'; then
    ARGS+=(--enable-deterministic-inference)
  else
    echo "sglang_server.sh: this SGLang has no --enable-deterministic-inference; sampling is not reproducible" >&2
  fi
fi

# Do NOT set SGLANG_RETURN_ORIGINAL_LOGPROB: it makes the returned logprobs ignore the temperature, and the trainer
# uses them as log pi_roll of the tempered sampling distribution.
unset SGLANG_RETURN_ORIGINAL_LOGPROB

echo "+ $PY -m sglang.launch_server ${ARGS[*]} $*" >&2
exec "$PY" -m sglang.launch_server "${ARGS[@]}" "$@"
