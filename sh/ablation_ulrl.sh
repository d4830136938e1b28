#!/usr/bin/env bash
usage() {
  cat <<'EOF'
Usage: bash sh/ablation_ulrl.sh STUDY [SWEEP OPTIONS] [NAME_OR_GLOB...] [-- EXTRA ULRL ARGS]

ULRL's ablations (paper Sec. V, Appendices C-E, RQ3): each variant is ULRL with one setting
changed, written to defense/ulrl_<variant>/ and run through sh/sweep.sh (resumable, one job per
GPU, --dry-run; its options apply), then one table of the study's variants
(utils/analysis/report.py) per model.

  bash sh/ablation_ulrl.sh dispersion 'badnet_*'
  bash sh/ablation_ulrl.sh all --dry-run

Studies:
  alpha        alpha-0 ... alpha-1: --alpha 0, 0.1, 0.3, 0.7, 1.0 (Appendix E; 0.1 is Fashion-MNIST's)
  tau          tau-2 ... tau-4: --tau 2, 2.5, 3, 3.5, 4 (Table VII)
  ht           ht-1 ... ht-10: --ht 1, 2, 3, 5, 10 (Table VIII)
  dispersion   dispersion-mad|sd|iqr: --dispersion (Appendix C)
  regularizer  regularizer-cosine|inner|none: --regularizer (Table V, Appendix D)
  random       random-k1 ... random-k10: --selection random --random_k 1, 2, 5, 10 (Table VI)
  ratio        ratio-0.001 ... ratio-0.1: --ratio 0.001 ... 0.1 (RQ3, Fig. 7)
  stop_rule    stop_rule-epoch|step: --stop_rule (the public code's rule or the paper's)
  all          every study above

The table goes to <record_dir>/ablation_<study>.md and .csv.
EOF
}
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
STUDIES="alpha tau ht dispersion regularizer random ratio stop_rule"

variants() {  # study -> lines "tag ULRL-ARGS..."
  case "$1" in
    alpha) for v in 0 0.1 0.3 0.7 1.0; do echo "alpha-$v --alpha $v"; done ;;
    tau) for v in 2 2.5 3 3.5 4; do echo "tau-$v --tau $v"; done ;;
    ht) for v in 1 2 3 5 10; do echo "ht-$v --ht $v"; done ;;
    dispersion) for v in mad sd iqr; do echo "dispersion-$v --dispersion $v"; done ;;
    regularizer) for v in cosine inner none; do echo "regularizer-$v --regularizer $v"; done ;;
    random) for v in 1 2 5 10; do echo "random-k$v --selection random --random_k $v"; done ;;
    ratio) for v in 0.001 0.002 0.005 0.01 0.02 0.05 0.1; do echo "ratio-$v --ratio $v"; done ;;
    stop_rule) for v in epoch step; do echo "stop_rule-$v --stop_rule $v"; done ;;
    *) return 1 ;;
  esac
}

study="${1:-}"
case "$study" in
  -h|--help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
  all) studies=$STUDIES ;;
  *) variants "$study" >/dev/null || { echo "unknown study '$study': one of $STUDIES all" >&2; exit 2; }
     studies=$study ;;
esac
shift
sweep=(); extra=(); record_dir=record; dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; extra=("$@"); break ;;
    --record_dir) record_dir="$2"; sweep+=("$1" "$2"); shift ;;
    --dry-run) dry=1; sweep+=("$1") ;;
    --defenses|--tag) echo "$1 is set by this script (ULRL, one tag per variant)" >&2; exit 2 ;;
    *) sweep+=("$1") ;;
  esac
  shift
done

failed=0
for s in $studies; do
  tags=()
  while read -r tag args; do
    tags+=("ulrl_$tag")
    # shellcheck disable=SC2086  # the variant's arguments split on spaces
    bash "$ROOT/sh/sweep.sh" --defenses ulrl --tag "$tag" "${sweep[@]+"${sweep[@]}"}" \
      -- "${extra[@]+"${extra[@]}"}" $args || failed=1
  done < <(variants "$s")
  [ $dry -eq 1 ] || python3 -m utils.report "$record_dir" --out "$record_dir/ablation_$s" \
    --defenses "${tags[@]}" || failed=1
done
exit $failed
