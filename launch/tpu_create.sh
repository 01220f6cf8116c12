#!/usr/bin/env bash
# Usage: bash launch/tpu_create.sh   (env: TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION)
# Creates the TPU VM (a single host such as v5litepod-8, or a multi-host pod slice); SPOT=1 for
# spot capacity.
set -euo pipefail
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

echo "creating $ACCELERATOR_TYPE '$TPU_NAME' in $ZONE (image $RUNTIME_VERSION, spot=$SPOT)" >&2
flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
if [[ "$SPOT" == 1 ]]; then
  flags+=(--spot)
fi
tpu_vm create "${flags[@]}"
echo "next: bash launch/tpu_setup.sh" >&2
