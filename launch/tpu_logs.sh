#!/usr/bin/env bash
# Usage: bash launch/tpu_logs.sh [WORKER] [LINES]   (WORKER: 0 (default), 1, ..., or all)
# Tails (follows, unless FOLLOW=0) the per-host log written by tpu_run.sh. `all` prints the last
# LINES of every worker's log without following, which shows the first worker that failed.
set -euo pipefail
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

worker=${1:-0}
lines=${2:-100}
if ! [[ "$lines" =~ ^[0-9]+$ && ( "$worker" == all || "$worker" =~ ^[0-9]+$ ) ]]; then
  echo "WORKER must be a number or 'all', LINES a number (got '$worker' '$lines')" >&2
  exit 2
fi
follow=-F
if [[ "$worker" == all || "${FOLLOW:-1}" == 0 ]]; then
  follow=""
fi
logs="\$HOME/$(printf %q "$LOG_DIR")"
on_workers "$worker" "echo \"== \$(hostname)\"; tail -n $lines $follow $logs/\$(hostname).log"
