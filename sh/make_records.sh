#!/usr/bin/env bash
usage() {
  cat <<'EOF'
Usage: bash sh/make_records.sh [--dataset D] [--model M] [--record_dir DIR] [--attacks "a b ..."]
                               [--force] [--dry-run] [-- EXTRA ATTACK ARGS]

Make the attack suite for one data set and model: one record per attack in attack/*.py.

  bash sh/make_records.sh --dataset fashion_mnist --model smallcnn
  bash sh/make_records.sh --dataset cifar10 --attacks "badnet blended" -- --device cuda:1

Each attack reads config/attack/<attack>/<dataset>.yaml when it exists, else default.yaml, with
--dataset and --model overriding the yaml (defaults: fashion_mnist, smallcnn, every attack, record
folder "record"). Records are named <attack>_<dataset>_<model>; existing ones are skipped unless
--force. An attack that fails (or refuses the data set) is reported and the others still run; the
exit code is 1 if any failed. One line per attack; its full output is kept in
<record_dir>/logs/<record>.txt. --dry-run prints the commands instead of running them.
EOF
}
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

dataset=fashion_mnist; model=smallcnn; record_dir=record; attacks=""; force=0; dry=0; extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dataset) dataset="$2"; shift ;;
    --model) model="$2"; shift ;;
    --record_dir) record_dir="$2"; shift ;;
    --attacks) attacks="$2"; shift ;;
    --force) force=1 ;;
    --dry-run) dry=1 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument '$1' (bash sh/make_records.sh --help)" >&2; exit 2 ;;
  esac
  shift
done

for value in "$dataset" "$model" $attacks; do  # names, not paths: they build file names below
  [[ "$value" =~ ^[a-z0-9_]+$ ]] || { echo "'$value' is not a data set, model or attack name (lowercase letters, digits, _)" >&2; exit 2; }
done
if [ -z "$attacks" ]; then
  attacks=$(for f in "$ROOT"/attack/*.py; do basename "$f" .py; done | grep -v '^_' | tr '\n' ' ')
fi

failed=0
for attack in $attacks; do
  script="$ROOT/attack/$attack.py"
  [ -f "$script" ] || { echo "$attack: no attack/$attack.py"; failed=$((failed + 1)); continue; }
  yaml="$ROOT/config/attack/$attack/$dataset.yaml"
  [ -f "$yaml" ] || yaml="$ROOT/config/attack/$attack/default.yaml"
  name="${attack}_${dataset}_${model}"
  cmd=(python3 "$script" --yaml_path "$yaml" --dataset "$dataset" --model "$model"
       --record_dir "$record_dir" --save_folder_name "$name" "${extra[@]+"${extra[@]}"}")
  if [ $dry -eq 1 ]; then echo "${cmd[*]}"; continue; fi
  if [ -f "$record_dir/$name/attack_result.pt" ] && [ $force -eq 0 ]; then
    echo "$name: exists (--force remakes it)"; continue
  fi
  [ $force -eq 1 ] && cmd+=(--force)
  mkdir -p "$record_dir/logs"
  log="$record_dir/logs/$name.txt"
  if "${cmd[@]}" > "$log" 2>&1; then
    grep -E "C-ACC .* ASR" "$log" | tail -n 1
  else
    echo "$name: FAILED: $(grep -m1 -E '^error:|ERROR' "$log" || tail -n 1 "$log")"
    failed=$((failed + 1))
  fi
done
exit $([ $failed -eq 0 ] && echo 0 || echo 1)
