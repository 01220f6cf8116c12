#!/usr/bin/env bash
# Usage: TEACHER_MODEL=Qwen/Qwen3-32B TEACHER_TP=4 bash launch/teacher_vllm.sh [EXTRA_VLLM_FLAGS...]
# Serves the teacher with `vllm serve` on an OpenAI-compatible /v1 for our openai_completions
# client. The flags, and why the client needs them:
#   --served-model-name   requests carry "model": config.teacher.model ("teacher"); else HTTP 404
#   --host/--port         training hosts connect to http://HOST:PORT/v1
#   --max-model-len       prompt + student prefix + chunk must fit, or vLLM answers HTTP 400
#   --generation-config vllm
#                         otherwise vLLM applies the checkpoint's generation_config.json (Qwen3:
#                         top_p 0.95, top_k 20) to every request that does not set them, silently
#                         narrowing the teacher's Monte Carlo samples
#   --seed                engine seed; each request also sends its own `seed`, so a rerun asks for
#                         the same samples (TEACHER_BATCH_INVARIANT=1: bit-identical answers
#                         whatever the batching; beta, slower)
#   --enable-prefix-caching
#                         the N samples of a fork, and the M forks of one response, share the
#                         prompt + response prefix: it is computed once, not M x N times
#   --max-num-seqs        sequences decoded at once (in-flight requests x n)
#   --disable-uvicorn-access-log
#                         one log line per request adds up to millions
# An API key, if you want one, goes in VLLM_API_KEY (never on the command line); point
# config.teacher.api_key_env at the variable holding it on the training side.
set -euo pipefail
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if [[ -z "$TEACHER_MODEL" ]]; then
  echo "TEACHER_MODEL is empty: set it to an HF model id or a local directory" >&2
  exit 2
fi
if [[ "$TEACHER_BATCH_INVARIANT" == 1 ]]; then
  export VLLM_BATCH_INVARIANT=1
fi
echo "training flags: --config.teacher.backend=openai_completions" \
  "--config.teacher.base_url=http://$(hostname):$TEACHER_PORT/v1" \
  "--config.teacher.model=$TEACHER_NAME" >&2
run vllm serve "$TEACHER_MODEL" \
  --served-model-name "$TEACHER_NAME" \
  --host "$TEACHER_HOST" --port "$TEACHER_PORT" \
  --max-model-len "$TEACHER_MAX_LEN" \
  --generation-config vllm \
  --seed "$TEACHER_SEED" \
  --enable-prefix-caching \
  --tensor-parallel-size "$TEACHER_TP" \
  --gpu-memory-utilization "$TEACHER_GPU_UTIL" \
  --max-num-seqs "$TEACHER_MAX_SEQS" \
  --disable-uvicorn-access-log \
  "$@"
