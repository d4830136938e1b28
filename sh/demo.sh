#!/usr/bin/env bash
usage() {
  cat <<'EOF'
Usage: bash sh/demo.sh [EXTRA ATTACK ARGS]

The demo: installs what is missing (sh/install.sh), makes a BadNets record on Fashion-MNIST with
the small CNN (record/demo_badnet_fashion_mnist, remade each time), defends it with ULRL and prints
C-ACC, ASR and RA before and after. Arguments go to attack/badnet.py (e.g. --device cpu).
EOF
}
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")/.."
bash sh/install.sh
python3 attack/badnet.py --yaml_path config/attack/badnet/fashion_mnist.yaml \
  --save_folder_name demo_badnet_fashion_mnist --force "$@"
python3 defense/ulrl.py --result_file demo_badnet_fashion_mnist \
  --yaml_path config/defense/ulrl/fashion_mnist.yaml
python3 -m utils.report record/demo_badnet_fashion_mnist/defense/ulrl/summary.json
