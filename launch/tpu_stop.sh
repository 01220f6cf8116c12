#!/usr/bin/env bash
# Usage: bash launch/tpu_stop.sh   (env: TPU_NAME ZONE PROJECT SESSION)
# Stops the run on every worker by killing our own tmux session ($SESSION) and nothing else: no
# process is matched by name. The TPU VM keeps running (delete it with gcloud when done).
set -euo pipefail
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

session=$(printf %q "$SESSION")
echo "stopping tmux session $SESSION on every worker of $TPU_NAME" >&2
stop="if tmux kill-session -t $session 2>/dev/null; then echo \"stopped $session on \$(hostname)\""
stop+="; else echo \"no session $session on \$(hostname)\"; fi"
on_workers all "$stop"
echo "delete the VM when done: gcloud compute tpus tpu-vm delete $TPU_NAME --zone=$ZONE" >&2
