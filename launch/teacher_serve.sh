#!/usr/bin/env bash
# Usage: TEACHER_MODEL=/ckpt/teacher bash launch/teacher_serve.sh [EXTRA_FLAGS, e.g. --dtype bfloat16]
# Serves an HF safetensors checkpoint (Llama / Qwen2 / Qwen3 family) with our own JAX server,
# omniopd_jax.serve: the same OpenAI-compatible /v1/completions the openai_completions client
# speaks, on any JAX accelerator (or CPU). Run it on a host other than the training hosts: an
# accelerator is held by one process.
set -euo pipefail
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "$TEACHER_MODEL" ]]; then
  echo "TEACHER_MODEL is empty: set it to a local HF directory (config.json + safetensors)" >&2
  exit 2
fi
python=$VENV/bin/python
if [[ "$VENV" != /* ]]; then
  python=$repo_root/$VENV/bin/python
fi
if [[ ! -x "$python" ]]; then
  python=python3
fi
echo "training flags: --config.teacher.backend=openai_completions" \
  "--config.teacher.base_url=http://$(hostname):$TEACHER_PORT/v1" \
  "--config.teacher.model=$TEACHER_NAME" >&2
cd "$repo_root"
run "$python" -m omniopd_jax.serve --model "$TEACHER_MODEL" --served_model_name "$TEACHER_NAME" \
  --host "$TEACHER_HOST" --port "$TEACHER_PORT" "$@"
