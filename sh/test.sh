#!/usr/bin/env bash
# Installs what the tests need, then runs the default test suite (slow tests: add -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash sh/install.sh
python3 -m pytest "$@"
