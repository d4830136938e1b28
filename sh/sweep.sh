#!/usr/bin/env bash
usage() {
  cat <<'EOF'
Usage: bash sh/sweep.sh [OPTIONS] [NAME_OR_GLOB...] [-- EXTRA DEFENSE ARGS]

Run defenses over attack records: every (record, defense) pair, resumable, one job per GPU.

  bash sh/sweep.sh --defenses "ft ulrl" 'badnet_*' -- --retune_check
  bash sh/sweep.sh --dry-run          # the commands of every unfinished pair, as a runnable script

Options:
  --record_dir DIR   folder of the records (default: record)
  --defenses "A B"   defenses to run (default: every defense/*.py)
  --tag TAG          pass --tag TAG, results in defense/<method>_<TAG>/ (variants of any defense)
  --force            rerun pairs that already have a summary.json (default: skip them)
  --jobs N           parallel jobs (default: one per GPU that nvidia-smi -L lists, each with its
                     own CUDA_VISIBLE_DEVICES; 1 without GPUs)
  --dry-run          print the commands instead of running them
  --task_list FILE   write the unfinished pairs' commands to FILE, one per line (sh/slurm_sweep.sh)
  -h, --help         this text

Records: the folders under --record_dir with an attack_result.pt (default: all). Each pair reads
config/defense/<method>/<dataset>_<model>.yaml, else <dataset>.yaml, else default.yaml, unless
--yaml_path is among the extra arguments; dataset and model come from the record's
attack_summary.json, else from its attack_result.pt, and must be registered names (a record is
untrusted: utils/analysis/sweep_tools.py). A pair is done when its summary.json is a result this
user's runs sealed (a record can ship files of its own). A pair's output is kept in
<record_dir>/<record>/defense/<method>_run.txt (never written through a link) and one result line
is printed (utils/analysis/report.py). Exit code 1 if a pair failed or a pattern matched no record.
EOF
}
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

record_dir=record; defenses=""; tag=""; force=0; jobs=""; dry=0; task_list=""; patterns=(); extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --record_dir) record_dir="$2"; shift ;;
    --defenses) defenses="$2"; shift ;;
    --tag) tag="$2"; shift ;;
    --force) force=1 ;;
    --jobs) jobs="$2"; shift ;;
    --dry-run) dry=1 ;;
    --task_list) task_list="$2"; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "unknown option '$1' (bash sh/sweep.sh --help)" >&2; exit 2 ;;
    *) patterns+=("$1") ;;
  esac
  shift
done
[ -d "$record_dir" ] || { echo "no folder $record_dir: pass --record_dir" >&2; exit 2; }
record_dir="$(cd "$record_dir" && pwd)"
[ ${#patterns[@]} -gt 0 ] || patterns=('*')
[ -n "$defenses" ] || defenses=$(for f in "$ROOT"/defense/*.py; do basename "$f" .py; done | grep -v '^_')
for method in $defenses; do
  [ -f "$ROOT/defense/$method.py" ] || { echo "no defense/$method.py: --defenses takes names of defense/*.py" >&2; exit 2; }
done
has_yaml=0
for a in "${extra[@]+"${extra[@]}"}"; do [ "$a" = "--yaml_path" ] && has_yaml=1; done

gpus=()
if command -v nvidia-smi >/dev/null 2>&1; then
  mapfile -t gpus < <(nvidia-smi -L 2>/dev/null | sed -n 's/^GPU \([0-9][0-9]*\):.*/\1/p')
fi
[ -n "$jobs" ] || jobs=$(( ${#gpus[@]} > 0 ? ${#gpus[@]} : 1 ))
[ -n "$task_list" ] && : > "$task_list"

tools() { python3 -m utils.sweep_tools "$@"; }

pick_yaml() {  # method dataset model -> the yaml path, or nothing
  local dir="$ROOT/config/defense/$1"
  for name in "$2_$3" "$2" default; do
    [ -f "$dir/$name.yaml" ] && { echo "$dir/$name.yaml"; return; }
  done
}

status_dir=$(mktemp -d); trap 'rm -rf "$status_dir"' EXIT
slot_pid=(); slot=0
acquire_slot() {  # sets $slot to a slot whose job has ended, waiting while all are busy
  while :; do
    for ((i = 0; i < jobs; i++)); do
      if [ -z "${slot_pid[$i]:-}" ] || ! kill -0 "${slot_pid[$i]}" 2>/dev/null; then slot=$i; return; fi
    done
    wait -n 2>/dev/null || sleep 1
  done
}

run_pair() {  # name folder summary log command... : run it, print one result line
  local name=$1 folder=$2 summary=$3 log=$4; shift 4
  if "$@" > "$log" 2>&1; then
    python3 -m utils.report --lines "$summary"
  else
    echo "$name $folder: FAILED: $(grep -m1 -E '^error:|ERROR' "$log" || tail -n 1 "$log")"
    touch "$status_dir/failed.$BASHPID"
  fi
}

shopt -s nullglob
failed=0; n=0
for pattern in "${patterns[@]}"; do
  matches=()
  for pt in "$record_dir"/$pattern/attack_result.pt; do [ -f "$pt" ] && matches+=("$pt"); done
  [ ${#matches[@]} -gt 0 ] || { echo "$pattern: no record matches in $record_dir/"; failed=$((failed + 1)); continue; }
  for pt in "${matches[@]}"; do
    name=$(basename "$(dirname "$pt")")
    info=""
    for method in $defenses; do
      folder="$method${tag:+_$tag}"
      summary="$record_dir/$name/defense/$folder/summary.json"
      if [ -f "$summary" ] && [ $force -eq 0 ]; then
        if reason=$(tools done "$summary"); then
          line="$(python3 -m utils.report --lines "$summary")  (existing; --force reruns)"
          if [ $dry -eq 1 ] || [ -n "$task_list" ]; then echo "# $line"; else echo "$line"; fi
          continue
        fi
        echo "# $name $folder: summary.json is not a result of this tool ($reason): running it"
      fi
      cmd=(python3 "$ROOT/defense/$method.py" --result_file "$name" --record_dir "$record_dir")
      if [ $has_yaml -eq 0 ]; then
        if [ -z "$info" ] && ! info=$(tools record-info "$record_dir/$name" 2>&1); then
          echo "$name: FAILED: ${info#error: }"; info=""; failed=$((failed + 1)); break
        fi
        # shellcheck disable=SC2086  # "dataset model": two registered names, checked above
        yaml=$(pick_yaml "$method" $info)
        [ -n "$yaml" ] && cmd+=(--yaml_path "$yaml")
      fi
      [ -n "$tag" ] && cmd+=(--tag "$tag")
      cmd+=("${extra[@]+"${extra[@]}"}")
      if [ -n "$task_list" ]; then printf '%q ' "${cmd[@]}" >> "$task_list"; echo >> "$task_list"; n=$((n + 1)); continue; fi
      if [ $dry -eq 1 ]; then  # the GPUs in turn, as the slots of a real run take them
        [ ${#gpus[@]} -gt 0 ] && printf 'CUDA_VISIBLE_DEVICES=%s ' "${gpus[$((n % ${#gpus[@]}))]}"
        printf '%q ' "${cmd[@]}"; echo; n=$((n + 1)); continue
      fi
      acquire_slot
      env_cmd=(env)
      [ ${#gpus[@]} -gt 0 ] && env_cmd+=("CUDA_VISIBLE_DEVICES=${gpus[$((slot % ${#gpus[@]}))]}")
      if ! refused=$(tools prepare-log "$record_dir/$name" "${folder}_run.txt" 2>&1); then
        echo "$name $folder: FAILED: ${refused#error: }"; failed=$((failed + 1)); continue
      fi
      run_pair "$name" "$folder" "$summary" "$record_dir/$name/defense/${folder}_run.txt" \
        "${env_cmd[@]}" "${cmd[@]}" &
      slot_pid[$slot]=$!
      [ "$jobs" -gt 1 ] || wait "${slot_pid[$slot]}"
    done
  done
done
wait
[ -n "$task_list" ] && echo "$n tasks written to $task_list"
failed=$((failed + $(find "$status_dir" -name 'failed.*' | wc -l)))
exit $([ $failed -eq 0 ] && echo 0 || echo 1)
