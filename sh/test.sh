#!/usr/bin/env bash
usage() {
  cat <<'EOF'
Usage: bash sh/test.sh [PYTEST ARGS...]

Installs what the tests need (sh/install.sh, and the optional extras of requirements-optional.txt,
timm, so that its path is tested too), then runs the default test suite with pytest; the
arguments go to pytest (slow tests: -m slow; one file: tests/test_report.py; pytest's own help:
python3 -m pytest --help).
EOF
}
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")/.."
bash sh/install.sh
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  -r requirements-optional.txt
python3 -m pytest "$@"
