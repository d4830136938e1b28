#!/usr/bin/env bash
usage() {
  cat <<'EOF'
Usage: bash sh/test_portability.sh [--out DIR] [--seeds "0 1 2"] [--threads "1 2"] [PYTEST ARGS...]

The outcome tests (pytest marker `outcome`: bounds on ASR, C-ACC, RA, flagged neurons) under six
variations, seeds 0, 1, 2 x one and two torch threads, then one table: each bound, its value per
variation, and the smallest margin (negative: a variation fails it). See tests/outcomes.py.

  bash sh/test_portability.sh tests/test_end_to_end.py      # one file's outcome tests only

  --out DIR         keep each variation's log and values here (default: a new temporary folder)
  --seeds "S ..."   seeds (ULRL_TEST_SEED) to run (default: 0 1 2)
  --threads "T ..." thread counts (default: 1 2); T threads = the process pinned to cores 0..T-1
                    with taskset, as the code uses the cores its process may run on
  -h, --help        this text

Exit code 1 if any bound failed under any variation. About 6 x the outcome tests' time (see the
README's test section).
EOF
}
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

out=""; seeds="0 1 2"; threads="1 2"; pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift ;;
    --seeds) seeds="$2"; shift ;;
    --threads) threads="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) pytest_args+=("$1") ;;
  esac
  shift
done
[ -n "$out" ] || out="$(mktemp -d -t ulrl_portability.XXXXXX)"
mkdir -p "$out"
cores=$(nproc --all)
status=0
for t in $threads; do
  if [ "$t" -gt "$cores" ]; then
    echo "skipping $t threads: this machine has $cores cores" >&2; continue
  fi
  for s in $seeds; do
    name="seed${s}_threads${t}"
    rm -f "$out/$name.jsonl"
    echo "== $name" >&2
    ULRL_TEST_SEED="$s" ULRL_OUTCOME_LOG="$out/$name.jsonl" \
      taskset -c "0-$((t - 1))" python3 -m pytest -q -p no:cacheprovider --durations=0 \
      -m "outcome and not slow" "${pytest_args[@]}" > "$out/$name.log" 2>&1 || status=1
    tail -n 1 "$out/$name.log" >&2
  done
done
python3 -m tests.outcome_table "$out" || status=1
echo "logs: $out" >&2
exit $status
