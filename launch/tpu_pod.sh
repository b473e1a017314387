#!/usr/bin/env bash
# Run sap_jax on a Cloud TPU VM pod slice: create (or reuse) the slice, install
# the project on every worker, start the same command on all of them.
#
#   launch/tpu_pod.sh --name sap-r50 --zone us-central2-b --accelerator v4-32 \
#       --bucket gs://my-bucket --config configs/imagenet_r50.py --run r50-p048 \
#       [--dry-run] [-- --config.budget.p=0.48 ...]
#
# Before a slice is created (with --accelerator), the run is compiled for it on this
# machine (python -m sap_jax.aot, which needs the [tpu] extra here): a run whose steps do
# not fit in the chips' HBM is refused before anything is paid for.
# Every worker runs `python -m sap_jax.main`, detached (it survives the end of
# this command), logging to ~/sap_jax_logs/$RUN.log, copied to
# $BUCKET/runs/$RUN/logs/ when it ends; jax.distributed.initialize() detects the
# pod by itself. Data is read from $BUCKET/tensorflow_datasets (TFDS_DATA_DIR).
# Rerunning the same command after a preemption brings the slice back (a
# PREEMPTED or TERMINATED one is recreated, a STOPPED one started) and resumes
# the run; while the run is alive, it starts no second copy.
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
  --attach               after starting (or if already running), follow worker 0's log
  --logs                 print the end of worker 0's log and exit
  --dry-run              check the fit, then print the commands instead of running them
  --skip-fit-check       do not compile the run for --accelerator on this machine first
  -- ARGS...             passed on to python -m sap_jax.main (config overrides)
EOF
}

val() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

name="" zone="" accelerator="" version="tpu-ubuntu2204-base" project="" spot=0
bucket="" config="" run="" repo="" ref="" skip_install=0 dry_run=0 attach=0 logs_only=0
fit_check=1
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
    --attach) attach=1; shift ;;
    --logs) logs_only=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --skip-fit-check) fit_check=0; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ -n "$config" ]] || die "--config is required"
[[ -n "$run" ]] || die "--run is required"
[[ "$run" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run must be a plain name (letters, digits, . _ -), got '$run'"
[[ "$bucket" == gs://* ]] || die "--bucket must be a gs:// path (got '${bucket}'): every worker reads data and writes checkpoints there"
root="$(cd "$(dirname "$0")/.." && pwd)"
[[ -f "$root/$config" ]] || die "config '$config' not found under $root"
if [[ -z "$repo" ]]; then
  repo="$(git -C "$root" remote get-url origin 2>/dev/null || true)"
  [[ -n "$repo" ]] || die "no --repo given and this clone has no 'origin' remote"
fi
# The workers clone the repository themselves: a path on this machine means nothing to them.
[[ "$repo" == *://* && "$repo" != file://* || "$repo" =~ ^[^/:]+@[^/:]+: ]] ||
  die "repository '$repo' is a local path the workers cannot reach: push to a remote they can clone and pass --repo URL"
[[ -n "$ref" ]] || ref="$(git -C "$root" rev-parse HEAD)"
# The workers run the config as committed at REF: refuse one that is untracked or changed here.
git -C "$root" cat-file -e "$ref^{commit}" 2>/dev/null ||
  die "ref '$ref' is not a commit of this clone: fetch it, or pass a --ref this clone has"
git -C "$root" cat-file -e "$ref:$config" 2>/dev/null ||
  die "config '$config' is not in commit $ref: commit it (and push), or the workers will not have it"
git -C "$root" diff --quiet "$ref" -- "$config" ||
  die "config '$config' differs from commit $ref: commit (and push) the change, or the workers will run the committed one"
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

poll_s="${SAP_JAX_TPU_POLL_S:-30}"   # seconds between state checks while the slice changes
max_polls="${SAP_JAX_TPU_MAX_POLLS:-120}"

# The slice's state: READY, CREATING, ..., or MISSING when it does not exist.
tpu_state() {
  local state
  state="$("${gcloud_tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null)" ||
    state=MISSING
  printf '%s' "${state:-MISSING}"
}

# Bring the slice to READY whatever state it is in.
ensure_ready() {
  local state polls=0
  while :; do
    state="$(tpu_state)"
    case "$state" in
      READY) return 0 ;;
      MISSING)
        [[ -n "$accelerator" ]] || die "TPU '$name' does not exist; give --accelerator to create it"
        echo "TPU '$name' does not exist: creating it" >&2
        run_cmd "${create[@]}" ;;
      PREEMPTED|TERMINATED)
        [[ -n "$accelerator" ]] || die "TPU '$name' is $state; give --accelerator to recreate it"
        echo "TPU '$name' is $state: deleting and recreating it" >&2
        run_cmd "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
        run_cmd "${create[@]}" ;;
      STOPPED)
        echo "TPU '$name' is STOPPED: starting it" >&2
        run_cmd "${gcloud_tpu[@]}" start "$name" "${where[@]}" ;;
      CREATING|STARTING|RESTARTING|STOPPING|REPAIRING|DELETING)
        echo "TPU '$name' is $state: waiting" >&2
        sleep "$poll_s" ;;
      *) die "TPU '$name' is in state '$state', which this script does not handle: see the console" ;;
    esac
    polls=$((polls + 1))
    [[ $polls -lt $max_polls ]] || die "TPU '$name' is not READY after $polls checks (last state: $state)"
  done
}

ssh_all=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all)
ssh_0=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=0)
log="\$HOME/sap_jax_logs/$run.log"
pid="\$HOME/sap_jax_logs/$run.pid"
alive="[ -f $pid ] && kill -0 \$(cat $pid) 2>/dev/null"
if [[ $logs_only -eq 1 ]]; then
  run_cmd "${ssh_0[@]}" --command "tail -n 100 $log"
  exit 0
fi

# 0. Will the run fit? Compile every step for the accelerator type here, before paying.
if [[ $fit_check -eq 1 && -n "$accelerator" ]]; then
  py="${SAP_JAX_PYTHON:-$root/.venv/bin/python}"
  [[ -x "$py" ]] || py=python3
  overrides=()
  for a in "${extra[@]}"; do [[ "$a" != --config.* ]] || overrides+=("$a"); done
  echo "# fit check: compiling the run for $accelerator on this machine (sap_jax.aot)" >&2
  if ! (cd "$root" && "$py" -m sap_jax.aot --config="$config" --topology="$accelerator" \
          "${overrides[@]}") >&2; then
    die "the run does not fit on $accelerator, or could not be compiled for it (see above): change the config or the slice, install the [tpu] extra here, or pass --skip-fit-check"
  fi
  echo "# fit check: the run fits on $accelerator"
fi

# 1. The slice.
create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator" --version "$version")
[[ $spot -eq 0 ]] || create+=(--spot)
if [[ $dry_run -eq 1 ]]; then
  echo "# brings TPU '$name' to READY: creates it if missing; deletes and recreates it if"
  echo "# PREEMPTED or TERMINATED; starts it if STOPPED; waits while it changes state"
  [[ -z "$accelerator" ]] || run_cmd "${create[@]}"
else
  ensure_ready
fi

# 2. The project on every worker: a pinned install, plus JAX's TPU runtime. The runtime's
# Python may be older than the 3.11 sap_jax needs (tpu-ubuntu2204-base has 3.10): install it.
if [[ $skip_install -eq 0 ]]; then
  # A worker whose run is alive keeps its code: checking out another commit under it would
  # make its next resume run mixed code.
  install="if $alive; then echo \"\$(hostname): $run is running: not reinstalling\"; exit 0; fi"
  install+="; set -e; if [ ! -d sap_jax ]; then git clone $(q "$repo") sap_jax; fi; cd sap_jax"
  install+=" && git fetch --all --quiet && git checkout --quiet $(q "$ref")"
  install+=" && py=python3 && if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'"
  install+="; then sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv"
  install+=" && py=python3.11; fi"
  install+=" && \$py -m venv .venv && .venv/bin/python -c 'import sys; assert sys.version_info >= (3, 11), sys.version'"
  install+=" && .venv/bin/pip install --quiet -c constraints.txt -e ."
  install+=" && .venv/bin/pip install --quiet -c constraints.txt 'jax[tpu]'"
  run_cmd "${ssh_all[@]}" --command "$install"
fi

# 3. The same command everywhere, detached; process 0 writes the reports. A worker whose
# copy of this run is still alive (its pid file) starts no second one.
main="TFDS_DATA_DIR=$(q "$tfds_dir") .venv/bin/python -m sap_jax.main"
main+=" --config=$(q "$config") --workdir=$(q "$workdir")"
main+=" --config.data_dir=$(q "$tfds_dir")"
for a in "${extra[@]}"; do main+=" $(q "$a")"; done
main+="; rc=\$?; gcloud storage cp $log $(q "$workdir/logs/")\$(hostname).log >/dev/null 2>&1; exit \$rc"
start="cd sap_jax && mkdir -p \$HOME/sap_jax_logs"
start+=" && if $alive; then echo \"\$(hostname): $run is already running\""
start+="; else nohup bash -c $(q "$main") > $log 2>&1 < /dev/null & echo \$! > $pid"
start+="; echo \"\$(hostname): started $run\"; fi"
run_cmd "${ssh_all[@]}" --command "$start"
[[ $attach -eq 0 ]] || run_cmd "${ssh_0[@]}" --command "tail -n +1 -F $log"
