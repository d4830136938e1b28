#!/usr/bin/env bash
usage() {
  cat <<'EOF'
Usage: bash sh/ulrl_many.sh [--force] [--record_dir DIR] NAME_OR_GLOB... [-- EXTRA ULRL ARGS]

Run ULRL over many attack records, one line of results per record: sh/sweep.sh for ULRL alone
(it takes the same options; bash sh/sweep.sh --help).

  bash sh/ulrl_many.sh 'badnet_*' blended_0_1 -- --device cuda:1

The yaml is picked per record from config/defense/ulrl/<dataset>.yaml unless --yaml_path is among
the extra arguments. Records that already have results are skipped unless --force.
EOF
}
set -uo pipefail
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
exec bash "$(dirname "$0")/sweep.sh" --defenses ulrl "$@"
