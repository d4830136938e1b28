#!/usr/bin/env bash
# The demo: a BadNets record on Fashion-MNIST with the small CNN, defended by ULRL, before/after table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash sh/install.sh
python3 attack/badnet.py --yaml_path config/attack/badnet/fashion_mnist.yaml \
  --save_folder_name demo_badnet_fashion_mnist --force "$@"
python3 defense/ulrl.py --result_file demo_badnet_fashion_mnist \
  --yaml_path config/defense/ulrl/fashion_mnist.yaml
python3 -m utils.report record/demo_badnet_fashion_mnist/defense/ulrl/summary.json
