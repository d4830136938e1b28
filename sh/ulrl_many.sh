#!/usr/bin/env bash
# Run ULRL over many attack records, one line of results per record.
#
#   bash sh/ulrl_many.sh [--force] [--record_dir DIR] NAME_OR_GLOB... [-- EXTRA ULRL ARGS]
#   bash sh/ulrl_many.sh 'badnet_*' blended_0_1 -- --device cuda:1
#
# The yaml is picked per record from config/defense/ulrl/<dataset>.yaml unless --yaml_path is among
# the extra arguments. Records that already have results are skipped unless --force.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

force=0; record_dir=record; patterns=(); extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --record_dir) record_dir="$2"; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) patterns+=("$1") ;;
  esac
  shift
done
[ ${#patterns[@]} -gt 0 ] || { echo "usage: bash sh/ulrl_many.sh [--force] NAME_OR_GLOB... [-- ARGS]" >&2; exit 2; }

has_yaml=0
for a in "${extra[@]+"${extra[@]}"}"; do [ "$a" = "--yaml_path" ] && has_yaml=1; done

shopt -s nullglob
failed=0; ran=0
for pattern in "${patterns[@]}"; do
  matches=()
  for pt in "$record_dir"/$pattern/attack_result.pt; do [ -f "$pt" ] && matches+=("$pt"); done
  [ ${#matches[@]} -gt 0 ] || { echo "$pattern: no record matches in $record_dir/"; failed=$((failed + 1)); continue; }
  for pt in "${matches[@]}"; do
    name=$(basename "$(dirname "$pt")")
    out="$record_dir/$name/defense/ulrl/summary.json"
    if [ -f "$out" ] && [ $force -eq 0 ]; then
      echo "$(python3 "$ROOT/utils/report.py" "$out")  (existing; --force reruns)"; continue
    fi
    yaml=()
    if [ $has_yaml -eq 0 ]; then
      dataset=$(python3 -c "import sys; from utils.record import load_attack_record as l; print(l(sys.argv[1]).clean_data)" "$record_dir/$name" 2>/dev/null)
      [ -f "$ROOT/config/defense/ulrl/$dataset.yaml" ] && yaml=(--yaml_path "$ROOT/config/defense/ulrl/$dataset.yaml")
    fi
    log="$record_dir/$name/defense/ulrl_run.txt"
    mkdir -p "$record_dir/$name/defense"
    if python3 "$ROOT/defense/ulrl.py" --result_file "$name" --record_dir "$record_dir" "${yaml[@]+"${yaml[@]}"}" \
         "${extra[@]+"${extra[@]}"}" > "$log" 2>&1; then
      python3 "$ROOT/utils/report.py" "$out"; ran=$((ran + 1))
    else
      echo "$name: FAILED: $(grep -m1 -E 'ERROR|error:' "$log" || tail -n 1 "$log")"; failed=$((failed + 1))
    fi
  done
done
exit $([ $failed -eq 0 ] && echo 0 || echo 1)
