#!/usr/bin/env bash
usage() {
  cat <<'EOF'
Usage: [RECORD_DIR=DIR] bash sh/fashion_mnist_settings.sh

How config/defense/ulrl/fashion_mnist.yaml was chosen (README "Choosing the Fashion-MNIST
settings"): BadNets / smallcnn records with attack seeds 0-2, a relearn_lr x alpha grid on seed 0,
and the chosen settings on every seed (8 min 46 s on 2 CPU cores, README). Records go to $RECORD_DIR
(default /tmp/fm_settings); existing ones are reused. Takes no arguments.
EOF
}
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") ;;
  *) echo "unknown argument '$1' (bash sh/fashion_mnist_settings.sh --help)" >&2; exit 2 ;;
esac
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${RECORD_DIR:-/tmp/fm_settings}"
ulrl() { python3 "$ROOT/defense/ulrl.py" --record_dir "$DIR" --yaml_path "$ROOT/config/defense/ulrl/fashion_mnist.yaml" "$@" \
           | grep -E "after|flagged" | sed -E 's/^[0-9:]+ INFO //' | tr '\n' ' '; echo; }
for seed in 0 1 2; do
  [ -f "$DIR/badnet_s$seed/attack_result.pt" ] || python3 "$ROOT/attack/badnet.py" --record_dir "$DIR" \
      --yaml_path "$ROOT/config/attack/badnet/fashion_mnist.yaml" --save_folder_name "badnet_s$seed" --seed "$seed" | grep "C-ACC"
done
for lr in 0.005 0.01 0.02; do for alpha in 0.05 0.1 0.3; do
  echo "seed 0  relearn_lr $lr  alpha $alpha: $(ulrl --result_file badnet_s0 --relearn_lr $lr --alpha $alpha)"
done; done
for seed in 0 1 2; do echo "seed $seed  shipped yaml: $(ulrl --result_file badnet_s$seed)"; done
