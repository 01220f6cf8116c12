#!/usr/bin/env bash
# Usage: source "$(dirname "${BASH_SOURCE[0]}")/env.sh"   (by the other launch/*.sh, not by hand)
# Defaults for every launch script; export any of them first to override. No secrets live here:
# API keys stay in your own environment (the configs name the variable, e.g. ANTHROPIC_API_KEY).
# DRY_RUN=1 makes every script print its commands without running them.
set -euo pipefail

# TPU VM / pod slice. RUNTIME_VERSION is the VM image: v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5
# (v5p), v2-alpha-tpuv6e (v6e).
: "${TPU_NAME:=omniopd}"                     # name of the TPU VM (all workers of a slice share it)
: "${ZONE:=us-west4-a}"                      # a zone that offers ACCELERATOR_TYPE
: "${PROJECT:=}"                             # "": gcloud's configured project
: "${ACCELERATOR_TYPE:=v5litepod-8}"         # v5litepod-8 (v5e-8), v5litepod-32, v5p-16, v6e-8, ...
: "${RUNTIME_VERSION:=v2-alpha-tpuv5-lite}"
: "${SPOT:=0}"                               # 1: spot capacity (cheaper, preemptible)

# Code and environment on the workers. REPO_URL "": copy this checkout (tracked and untracked files,
# not ignored ones); else git clone REPO_URL at BRANCH.
: "${REPO_URL:=}"
: "${BRANCH:=main}"                          # branch to clone when REPO_URL is set
: "${REMOTE_DIR:=omniopd}"                   # checkout on each worker, relative to home
: "${PYTHON:=python3.11}"                    # creates the venv; apt-installed when missing
: "${VENV:=.venv}"                           # venv inside the checkout (absolute path: used as is)
: "${PIP_EXTRA:=tpu}"                        # setup.py extra: tpu on TPU VMs, cuda on GPU hosts

# Training run.
: "${CONFIG:=configs/math.py:pod}"           # --config of omniopd_jax.main
: "${WORKDIR:=}"                             # shared by all hosts, e.g. gs://BUCKET/omniopd/RUN
: "${SESSION:=omniopd}"                      # tmux session name: the only thing tpu_stop.sh kills
: "${LOG_DIR:=omniopd-logs}"                 # logs: in home on TPU workers, submit dir on SLURM
: "${ENV_FILE:=.omniopd_env}"                # in home; the job sources it if present (API keys)

# Multi-node GPU (SLURM).
: "${COORDINATOR_PORT:=12355}"               # jax.distributed coordinator port on the first node
: "${XLA_PYTHON_CLIENT_MEM_FRACTION:=0.95}"  # JAX preallocates 75% of GPU memory by default

# Teacher server (vLLM or omniopd_jax.serve).
: "${TEACHER_MODEL:=}"                       # HF model id or local directory of the teacher
: "${TEACHER_NAME:=teacher}"                 # served model name = --config.teacher.model
: "${TEACHER_HOST:=0.0.0.0}"                 # listen on every interface: training hosts connect
: "${TEACHER_PORT:=8000}"
: "${TEACHER_MAX_LEN:=4096}"                 # >= prompt + response + chunk, in teacher tokens
: "${TEACHER_TP:=1}"                         # tensor-parallel GPUs for the teacher (vLLM)
: "${TEACHER_GPU_UTIL:=0.90}"                # fraction of GPU memory vLLM may take
: "${TEACHER_MAX_SEQS:=256}"                 # sequences decoded concurrently (requests x n)
: "${TEACHER_SEED:=0}"                       # engine seed; requests also carry their own seed
: "${TEACHER_BATCH_INVARIANT:=0}"            # 1: VLLM_BATCH_INVARIANT=1 (reproducible, beta)

export XLA_PYTHON_CLIENT_MEM_FRACTION

# Print a command (shell-quoted) on stderr, then run it unless DRY_RUN=1.
run() {
  {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  } >&2
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    "$@"
  fi
}

# Single-quote a string for a remote shell: squote "it's" -> 'it'\''s'.
squote() {
  printf "'%s'" "${1//\'/\'\\\'\'}"
}

# --zone and, when set, --project for every gcloud call.
gcloud_scope=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  gcloud_scope+=(--project="$PROJECT")
fi

# gcloud compute tpus tpu-vm SUBCOMMAND TPU_NAME --zone ZONE [--project PROJECT] ARGS...
tpu_vm() {
  local sub=$1
  shift
  run gcloud compute tpus tpu-vm "$sub" "$TPU_NAME" "${gcloud_scope[@]}" "$@"
}

# Run a shell command string on TPU workers: on_workers WORKER COMMAND (WORKER: all, 0, 1, ...).
# Echoes the remote command as the workers' shell will read it (more legible than run's quoting).
on_workers() {
  echo "+ gcloud compute tpus tpu-vm ssh $TPU_NAME ${gcloud_scope[*]} --worker=$1 --command=..." >&2
  echo "    $2" >&2
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_scope[@]}" --worker="$1" --command="$2"
  fi
}
