#!/usr/bin/env bash
usage() {
  cat <<'EOF'
Usage: bash sh/install.sh

Installs what the project needs: the Python packages of requirements.txt (pip), and Debian's
Fashion-MNIST package (the demo's and tests' data) where apt is available and neither it nor
data/fashion_mnist/ is there. Safe to run again. Takes no arguments.
EOF
}
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") ;;
  *) echo "unknown argument '$1' (bash sh/install.sh --help)" >&2; exit 2 ;;
esac
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r requirements.txt

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && [ ! -d data/fashion_mnist ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST not found and apt-get is not available: put the four idx files" \
         "(train-images-idx3-ubyte.gz, ...) into data/fashion_mnist/" >&2
    exit 1
  fi
fi
