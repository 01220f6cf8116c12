#!/usr/bin/env bash
# Usage: WORKDIR=gs://BUCKET/omniopd/RUN bash launch/tpu_run.sh [CONFIG] [-- MAIN_FLAGS...]
#   e.g. bash launch/tpu_run.sh configs/math.py:pod -- \
#          --config.teacher.base_url=http://10.0.0.9:8000/v1
# Starts `python -m omniopd_jax.main` in a detached tmux session ($SESSION) on every worker; each
# host writes ~/$LOG_DIR/<hostname>.log. JAX finds the other workers of the slice by itself.
# Secrets (e.g. ANTHROPIC_API_KEY) never pass through here: put `export NAME=...` lines in
# ~/$ENV_FILE on each worker (chmod 600); the job sources that file when it exists.
set -euo pipefail
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if [[ $# -gt 0 && "$1" != "--" ]]; then
  CONFIG=$1
  shift
fi
if [[ $# -gt 0 && "$1" == "--" ]]; then
  shift
fi
if [[ -z "$WORKDIR" ]]; then
  echo "WORKDIR is empty: set it to a directory every worker can write, e.g." \
    "WORKDIR=gs://BUCKET/omniopd/\$(date +%m%d_%H%M) bash launch/tpu_run.sh" >&2
  exit 2
fi

main=(python -u -m omniopd_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@")
session=$(printf %q "$SESSION")
logs="\$HOME/$(printf %q "$LOG_DIR")"
# What tmux runs on each worker (the worker's shell expands $(hostname) and $HOME there).
env_file="\$HOME/$(printf %q "$ENV_FILE")"
job="set -o pipefail; if [ -f $env_file ]; then source $env_file; fi"
job+="; source $(printf %q "$VENV")/bin/activate && $(printf '%q ' "${main[@]}")"
log="$logs/\$(hostname).log"
job+="2>&1 | tee -a $log; echo \"[omniopd] exit status \$?\" >> $log"
remote="set -euo pipefail; cd $(printf %q "$REMOTE_DIR"); mkdir -p $logs"
remote+="; if tmux has-session -t $session 2>/dev/null; then"
remote+=" echo \"tmux session $session is already running on \$(hostname):"
remote+=" bash launch/tpu_stop.sh\" >&2; exit 1; fi"
# bash -c: the job needs bash (source, pipefail) whatever tmux's default shell is.
remote+="; tmux new-session -d -s $session bash -c $(squote "$job")"
remote+="; echo \"started $session on \$(hostname): log $log\""

echo "starting ${main[*]} on every worker of $TPU_NAME" >&2
on_workers all "$remote"
echo "follow: bash launch/tpu_logs.sh 0    stop: bash launch/tpu_stop.sh" >&2
