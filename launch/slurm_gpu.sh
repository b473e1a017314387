#!/usr/bin/env bash
# Submit sap_jax to a Slurm GPU cluster: one JAX process per GPU (default) or
# one per node, on N nodes, all running `python -m sap_jax.main`.
#
#   launch/slurm_gpu.sh --nodes 4 --gpus-per-node 8 --config configs/imagenet_r101.py \
#       --workdir /shared/runs/r101 [--data-dir /shared/tensorflow_datasets] \
#       [--per node] [--partition gpu] [--time 72:00:00] [--dry-run] [-- --config.budget.p=0.45]
#
# jax.distributed.initialize() reads the job layout from Slurm's environment.
# The workdir and data dir must be on storage every node sees. Slurm sends
# SIGTERM to every process some time before the time limit (--signal-lead):
# the run saves a checkpoint and exits 75, and the job requeues itself and
# resumes from the workdir, as after a preemption.
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  cat <<'EOF'

Options:
  --nodes N              nodes (default 1)
  --gpus-per-node G      GPUs per node (default 8)
  --per gpu|node         one process per GPU (default) or one per node driving all its GPUs
  --cpus-per-gpu C       CPU cores per GPU for the input pipeline (default 12)
  --time HH:MM:SS        wall-time limit (default 48:00:00)
  --partition P          Slurm partition (default: the cluster's)
  --account A            Slurm account (default: yours)
  --config PATH          sap_jax config, relative to the repository root
  --workdir DIR          shared directory for checkpoints and results
  --data-dir DIR         shared TFDS data directory (TFDS_DATA_DIR); not needed for digits/mnist5k
  --signal-lead S        seconds before the time limit that Slurm sends SIGTERM (default 300)
  --venv DIR             virtual environment with sap_jax and jax[cuda12] (default: REPO/.venv)
  --dry-run              print the batch script and the sbatch command; submit nothing
  -- ARGS...             passed on to python -m sap_jax.main (config overrides)
EOF
}

val() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
die() { echo "slurm_gpu.sh: $*" >&2; exit 2; }
posint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer (got '$2')"; }
# A Slurm --time value (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds.
slurm_seconds() {
  local t="$1" d=0 a b c
  if [[ "$t" == *-* ]]; then
    d="${t%%-*}"; IFS=: read -r a b c <<< "${t#*-}"
    echo $(( 10#$d * 86400 + 10#$a * 3600 + 10#${b:-0} * 60 + 10#${c:-0} ))
  else
    IFS=: read -r a b c <<< "$t"
    if [[ -n "$c" ]]; then echo $(( 10#$a * 3600 + 10#$b * 60 + 10#$c ))
    else echo $(( 10#$a * 60 + 10#${b:-0} )); fi
  fi
}

nodes=1 gpus=8 per=gpu cpus=12 time_limit=48:00:00 partition="" account=""
config="" workdir="" data_dir="" venv="" dry_run=0 lead=300
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) val "$@"; nodes="$2"; shift 2 ;;
    --gpus-per-node) val "$@"; gpus="$2"; shift 2 ;;
    --per) val "$@"; per="$2"; shift 2 ;;
    --cpus-per-gpu) val "$@"; cpus="$2"; shift 2 ;;
    --time) val "$@"; time_limit="$2"; shift 2 ;;
    --partition) val "$@"; partition="$2"; shift 2 ;;
    --account) val "$@"; account="$2"; shift 2 ;;
    --config) val "$@"; config="$2"; shift 2 ;;
    --workdir) val "$@"; workdir="$2"; shift 2 ;;
    --data-dir) val "$@"; data_dir="$2"; shift 2 ;;
    --venv) val "$@"; venv="$2"; shift 2 ;;
    --signal-lead) val "$@"; lead="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

posint --nodes "$nodes"
posint --gpus-per-node "$gpus"
posint --cpus-per-gpu "$cpus"
posint --signal-lead "$lead"
[[ "$per" == gpu || "$per" == node ]] || die "--per must be 'gpu' or 'node' (got '$per')"
[[ "$time_limit" =~ ^([0-9]+-[0-9]+(:[0-9]+){0,2}|[0-9]+(:[0-9]+){0,2})$ ]] ||
  die "--time must be a Slurm time limit such as 48:00:00, 90 (minutes) or 2-00:00 (got '$time_limit')"
(( $(slurm_seconds "$time_limit") > lead )) ||
  die "--signal-lead $lead s must be shorter than --time $time_limit, or the run is told to stop as it starts"
for opt in partition account; do  # they become #SBATCH lines: one plain word each
  [[ "${!opt}" =~ ^[A-Za-z0-9_.,:+-]*$ ]] || die "--$opt must be a Slurm name without spaces (got '${!opt}')"
done
[[ -n "$config" ]] || die "--config is required"
[[ -n "$workdir" ]] || die "--workdir is required (a directory every node can reach)"
root="$(cd "$(dirname "$0")/.." && pwd)"
[[ -f "$root/$config" ]] || die "config '$config' not found under $root"
venv="${venv:-$root/.venv}"

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

if [[ "$per" == gpu ]]; then
  tasks=$gpus            # JAX gives each process the GPU of its SLURM_LOCALID
  cpus_per_task=$cpus
  device_ids=""
else
  tasks=1                # one process sees every GPU of its node
  cpus_per_task=$((cpus * gpus))
  device_ids=$(seq -s, 0 $((gpus - 1)))
fi

main="$(q "$venv/bin/python") -m sap_jax.main --config=$(q "$config") --workdir=$(q "$workdir")"
[[ -z "$data_dir" ]] || main+=" --config.data_dir=$(q "$data_dir")"
for a in "${extra[@]}"; do main+=" $(q "$a")"; done

script="#!/usr/bin/env bash
#SBATCH --job-name=sap_jax
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$tasks
#SBATCH --gpus-per-node=$gpus
#SBATCH --cpus-per-task=$cpus_per_task
#SBATCH --time=$time_limit
#SBATCH --requeue
#SBATCH --signal=TERM@$lead
#SBATCH --output=$workdir/slurm-%j.out"
[[ -z "$partition" ]] || script+=$'\n'"#SBATCH --partition=$partition"
[[ -z "$account" ]] || script+=$'\n'"#SBATCH --account=$account"
script+="
set -uo pipefail
cd $(q "$root")"
[[ -z "$data_dir" ]] || script+=$'\n'"export TFDS_DATA_DIR=$(q "$data_dir")"
[[ -z "$device_ids" ]] || script+=$'\n'"export JAX_LOCAL_DEVICE_IDS=$device_ids"
# The run saved a checkpoint on SIGTERM (time limit or preemption): it exits 75 and leaves
# WORKDIR/PREEMPTED (srun may report another code when it stops the sibling tasks); requeue.
marker="$(q "$workdir/PREEMPTED")"
script+="
srun --kill-on-bad-exit=1 $main
rc=\$?
if [[ \$rc -eq 75 || -f $marker ]]; then rm -f $marker; scontrol requeue \"\$SLURM_JOB_ID\"; fi
exit \$rc"

if [[ $dry_run -eq 1 ]]; then
  echo "# batch script ($((nodes * tasks)) processes, $((nodes * gpus)) GPUs):"
  printf '%s\n' "$script"
  echo "# submit with:"
  echo "sbatch $(q "$workdir/sap_jax.sbatch")"
  exit 0
fi
command -v sbatch >/dev/null || die "sbatch not found: run this on a Slurm login node (or use --dry-run)"
[[ -x "$venv/bin/python" ]] || die "no virtual environment at $venv: create it as the README says \
(on a node with the cluster's CUDA), or pass --venv DIR"
mkdir -p "$workdir"
printf '%s\n' "$script" > "$workdir/sap_jax.sbatch"
sbatch "$workdir/sap_jax.sbatch"
