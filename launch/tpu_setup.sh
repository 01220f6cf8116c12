#!/usr/bin/env bash
# Usage: bash launch/tpu_setup.sh   (env: TPU_NAME ZONE PROJECT REPO_URL BRANCH REMOTE_DIR PYTHON)
# Puts the code on every worker (scp of this checkout, or git clone of REPO_URL), then creates the
# venv and runs pip install -e '.[tpu]' there. Safe to rerun: it refreshes the code and the venv.
set -euo pipefail
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=$(printf %q "$REMOTE_DIR")

if [[ -z "$REPO_URL" ]]; then
  # Tracked and untracked-but-not-ignored files: what you see in `git status`, without .venv etc.
  tarball=$(mktemp -t omniopd-XXXXXX.tar.gz)
  trap 'rm -f "$tarball"' EXIT
  echo "packing $repo_root into $tarball" >&2
  (cd "$repo_root" && git ls-files -z --cached --others --exclude-standard |
    tar czf "$tarball" --null -T -)
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:omniopd.tar.gz" --worker=all \
    "${gcloud_scope[@]}"
  fetch="mkdir -p $dir && tar xzf omniopd.tar.gz -C $dir && rm omniopd.tar.gz"
else
  url=$(printf %q "$REPO_URL")
  branch=$(printf %q "$BRANCH")
  fetch="if [ -d $dir/.git ]; then git -C $dir fetch origin $branch && git -C $dir checkout $branch"
  fetch+=" && git -C $dir pull --ff-only origin $branch"
  fetch+="; else git clone --branch $branch $url $dir; fi"
fi

venv=$(printf %q "$VENV")
py=$(printf %q "$PYTHON")
# TPU VM images ship Ubuntu 22.04's python3.10; setup.py needs >= 3.11 (jammy has python3.11).
install="if ! command -v $py >/dev/null 2>&1; then sudo apt-get update -qq"
install+=" && sudo apt-get install -y -qq $py $py-venv; fi"
install+="; cd $dir && $py -m venv $venv && $venv/bin/pip install -q -U pip"
install+=" && $venv/bin/pip install -q -e $(printf %q ".[$PIP_EXTRA]")"
# Import only: touching the TPU here would need every worker to join the same runtime.
install+=" && $venv/bin/python -c 'import jax, omniopd_jax; print(\"jax\", jax.__version__)'"
on_workers all "set -euo pipefail; $fetch; $install; echo \"set up on \$(hostname)\""
echo "next: WORKDIR=gs://BUCKET/omniopd/RUN bash launch/tpu_run.sh" >&2
