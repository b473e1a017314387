#!/usr/bin/env bash
# Run sap_jax on a Cloud TPU VM pod slice: create (or reuse) the slice, install
# the project on every worker, start the same command on all of them.
#
#   launch/tpu_pod.sh --name sap-r50 --zone us-central2-b --accelerator v4-32 \
#       --bucket gs://my-bucket --config configs/imagenet_r50.py --run r50-p048 \
#       [--dry-run] [-- --config.budget.p=0.48 ...]
#
# Every worker runs `python -m sap_jax.main`; jax.distributed.initialize()
# detects the pod by itself. Data is read from $BUCKET/tensorflow_datasets
# (TFDS_DATA_DIR), the workdir is $BUCKET/runs/$RUN. Rerunning the same command
# after a preemption reuses the slice (or recreates it) and resumes the run.
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  cat <<'EOF'

Options:
  --name NAME            TPU VM name (created if it does not exist)
  --zone ZONE            GCP zone, e.g. us-central2-b
  --accelerator TYPE     slice type, e.g. v4-32, v5litepod-64 (only used to create)
  --version VERSION      TPU VM runtime (default tpu-ubuntu2204-base)
  --project PROJECT      GCP project (default: gcloud's configured one)
  --spot                 create the slice as a Spot VM (preemptible)
  --bucket gs://BUCKET   holds tensorflow_datasets/ and runs/
  --config PATH          sap_jax config, relative to the repository root
  --run NAME             run name: the workdir is BUCKET/runs/NAME
  --repo URL             git repository to install (default: this clone's origin)
  --ref REF              git ref to install (default: this clone's HEAD commit)
  --skip-install         do not (re)install on the workers
  --dry-run              print the commands instead of running them
  -- ARGS...             passed on to python -m sap_jax.main (config overrides)
EOF
}

val() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

name="" zone="" accelerator="" version="tpu-ubuntu2204-base" project="" spot=0
bucket="" config="" run="" repo="" ref="" skip_install=0 dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) val "$@"; name="$2"; shift 2 ;;
    --zone) val "$@"; zone="$2"; shift 2 ;;
    --accelerator) val "$@"; accelerator="$2"; shift 2 ;;
    --version) val "$@"; version="$2"; shift 2 ;;
    --project) val "$@"; project="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --bucket) val "$@"; bucket="$2"; shift 2 ;;
    --config) val "$@"; config="$2"; shift 2 ;;
    --run) val "$@"; run="$2"; shift 2 ;;
    --repo) val "$@"; repo="$2"; shift 2 ;;
    --ref) val "$@"; ref="$2"; shift 2 ;;
    --skip-install) skip_install=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ -n "$config" ]] || die "--config is required"
[[ -n "$run" ]] || die "--run is required"
[[ "$bucket" == gs://* ]] || die "--bucket must be a gs:// path (got '${bucket}'): every worker reads data and writes checkpoints there"
root="$(cd "$(dirname "$0")/.." && pwd)"
[[ -f "$root/$config" ]] || die "config '$config' not found under $root"
if [[ -z "$repo" ]]; then
  repo="$(git -C "$root" remote get-url origin 2>/dev/null || true)"
  [[ -n "$repo" ]] || die "no --repo given and this clone has no 'origin' remote"
fi
[[ -n "$ref" ]] || ref="$(git -C "$root" rev-parse HEAD)"
bucket="${bucket%/}"
workdir="$bucket/runs/$run"
tfds_dir="$bucket/tensorflow_datasets"

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[[ -z "$project" ]] || where+=(--project "$project")

# Print a command as one copy-pasteable line, or run it.
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

run_cmd() {
  if [[ $dry_run -eq 1 ]]; then
    local out="" a
    for a in "$@"; do out+="$(q "$a") "; done
    printf '%s\n' "${out% }"
  else
    "$@"
  fi
}

# 1. The slice.
create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator" --version "$version")
[[ $spot -eq 0 ]] || create+=(--spot)
if [[ $dry_run -eq 1 ]]; then
  if [[ -n "$accelerator" ]]; then
    echo "# only if TPU '$name' does not exist yet:"
    run_cmd "${create[@]}"
  else
    echo "# reuses the existing TPU '$name'"
  fi
elif ! "${gcloud_tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  [[ -n "$accelerator" ]] || die "TPU '$name' does not exist; give --accelerator to create it"
  run_cmd "${create[@]}"
fi

# 2. The project on every worker: a pinned install, plus JAX's TPU runtime.
ssh_all=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all)
if [[ $skip_install -eq 0 ]]; then
  install="set -e; if [ ! -d sap_jax ]; then git clone $(q "$repo") sap_jax; fi; cd sap_jax"
  install+=" && git fetch --all --quiet && git checkout --quiet $(q "$ref")"
  install+=" && python3 -m venv .venv && .venv/bin/pip install --quiet -c constraints.txt -e ."
  install+=" && .venv/bin/pip install --quiet -c constraints.txt 'jax[tpu]'"
  run_cmd "${ssh_all[@]}" --command "$install"
fi

# 3. The same command everywhere; process 0 writes the reports.
main="cd sap_jax && TFDS_DATA_DIR=$(q "$tfds_dir") .venv/bin/python -m sap_jax.main"
main+=" --config=$(q "$config") --workdir=$(q "$workdir")"
main+=" --config.data_dir=$(q "$tfds_dir")"
for a in "${extra[@]}"; do main+=" $(q "$a")"; done
run_cmd "${ssh_all[@]}" --command "$main"
