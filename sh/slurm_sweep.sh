#!/usr/bin/env bash
usage() {
  cat <<'EOF'
Usage: bash sh/slurm_sweep.sh [--dry-run] [--sbatch "ARGS"] [SWEEP OPTIONS] [NAME_OR_GLOB...] [-- EXTRA DEFENSE ARGS]

The sweep on a SLURM cluster: one array task = one (record, defense) pair.

  bash sh/slurm_sweep.sh --sbatch "--partition gpu --gres gpu:1 --time 1:00:00" --defenses "ft ulrl"
  bash sh/slurm_sweep.sh --sbatch "--cpus-per-task 2" 'badnet_*'     # a cluster without GPUs

Lists the unfinished pairs with `sh/sweep.sh --task_list` (same options: --record_dir,
--defenses, --tag, --force, patterns, extra arguments) into
<record_dir>/slurm/tasks-<time>-<random>.txt and submits
`sbatch --array=1-N <ARGS> sh/slurm_sweep.sh --task <file>`; array task i runs line i of the file,
its output in <record_dir>/slurm/<job>_<i>.out. --sbatch replaces the default "--gres=gpu:1" (a
cluster without GPUs refuses that: pass --sbatch with your partition, time, CPUs). To resume after
failures or a time limit, run the same command again: finished pairs are not listed. --dry-run
prints the task list and the sbatch command without submitting. A single-node SLURM on this
machine: bash sh/slurm_local.sh.
EOF
}
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

if [ "${1:-}" = "--task" ]; then  # inside an array task
  line=$(sed -n "${SLURM_ARRAY_TASK_ID:?not inside a SLURM array task}p" "$2")
  [ -n "$line" ] || { echo "no task ${SLURM_ARRAY_TASK_ID} in $2" >&2; exit 2; }
  echo "$line"
  exec bash -c "$line"
fi

dry=0; sbatch_args="--gres=gpu:1"; record_dir=record; sweep=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --sbatch) sbatch_args="$2"; shift ;;
    --record_dir) record_dir="$2"; sweep+=("$1" "$2"); shift ;;
    -h|--help) usage; exit 0 ;;
    --) sweep+=("$@"); break ;;
    *) sweep+=("$1") ;;
  esac
  shift
done

[ -d "$record_dir" ] || { echo "no folder $record_dir: pass --record_dir" >&2; exit 2; }
if [ $dry -eq 0 ] && ! command -v sbatch >/dev/null 2>&1; then
  echo "sbatch not found: run this on the cluster's login node (or --dry-run)" >&2; exit 2
fi
record_dir="$(cd "$record_dir" && pwd)"
if [ $dry -eq 1 ]; then  # a dry run leaves nothing behind
  tasks=$(mktemp); trap 'rm -f "$tasks"' EXIT
else
  # records come from others: a link named slurm must not carry the task list (which the array
  # tasks run) into a folder of someone's choosing
  [ -L "$record_dir/slurm" ] && { echo "$record_dir/slurm is a symbolic link: remove it, then rerun" >&2; exit 2; }
  mkdir -p "$record_dir/slurm"
  # a unique name: a second submission in the same second must not replace a running array's list
  tasks=$(mktemp "$record_dir/slurm/tasks-$(date +%Y%m%d-%H%M%S)-XXXXXX.txt")
fi
bash "$ROOT/sh/sweep.sh" --task_list "$tasks" "${sweep[@]+"${sweep[@]}"}" || true
n=$(wc -l < "$tasks")
[ "$n" -gt 0 ] || { echo "nothing to run: every pair has its summary.json (--force reruns)"; rm -f "$tasks"; exit 0; }
read -r -a sbatch_split <<< "$sbatch_args"  # split on spaces, no glob expansion
submit=(sbatch --job-name sweep --array "1-$n" --output "$record_dir/slurm/%A_%a.out"
        "${sbatch_split[@]+"${sbatch_split[@]}"}" "$ROOT/sh/slurm_sweep.sh" --task "$tasks")
if [ $dry -eq 1 ]; then
  cat "$tasks"
  printf '%q ' "${submit[@]}"; echo
  exit 0
fi
if ! "${submit[@]}"; then
  rm -f "$tasks"  # nothing was submitted: no task list to mistake for a submitted one
  echo "sbatch refused the array (its message above); --sbatch \"ARGS\" sets its options (default --gres=gpu:1)" >&2
  exit 1
fi
