#!/usr/bin/env bash
usage() {
  cat <<'EOF'
Usage: bash sh/demo_own_model.sh [--model NAME] [--out DIR]

Defending a model that comes without a BackdoorBench record, end to end on Fashion-MNIST:

  1. someone else's backdoored model: attack/badnet.py trains MODEL (default resnet18, torchvision's)
     with a 3x3 white-patch backdoor to class 0 on 20,000 training images for 4 epochs; only its
     weights are used from here on;
  2. what a defender holds: those weights as DIR/model.safetensors, 500 clean training images and
     2,000 test images as PNGs in class folders (DIR/clean/<class>/, DIR/test/<class>/), and the
     suspected trigger as DIR/trigger.png;
  3. one command: defense/ulrl.py --model_file ... --clean_dir ... --test_dir ... --trigger_patch
     ... --target_label 0 --output_dir DIR/purified, which prints C-ACC / ASR / RA before and after;
  4. one function call: ulrl.purify(model, ImageFolder(DIR/clean), test=..., backdoor_test=...,
     target_label=0), printing the same metrics from its report.

DIR defaults to own_model_demo/ (remade each time).
EOF
}
set -euo pipefail
model=resnet18; out=own_model_demo
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift ;;
    --out) out="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument '$1' (bash sh/demo_own_model.sh --help)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
rm -rf "$out" && mkdir -p "$out"

echo "== 1. a backdoored $model (BadNets, target 0)"
python3 attack/badnet.py --yaml_path config/attack/badnet/fashion_mnist.yaml --model "$model" \
  --train_size 20000 --epochs 4 --record_dir "$out/attacker" --save_folder_name badnet | grep "C-ACC"

echo "== 2. what the defender holds: weights, PNG folders, the trigger"
python3 - "$out" <<'EOF'
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from utils.data.datasets import load_clean_dataset
from utils.data.record import load_attack_record

out = Path(sys.argv[1])
record = load_attack_record(out / "attacker" / "badnet")
save_file({k: v.contiguous() for k, v in record.state_dict.items()}, out / "model.safetensors")
generator = torch.Generator().manual_seed(1)
for split, train, count in (("clean", True, 500), ("test", False, 2000)):
    data = load_clean_dataset("fashion_mnist", "./data", train=train)
    for i in torch.randperm(len(data), generator=generator)[:count].tolist():
        folder = out / split / str(int(data.labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i, 0].numpy()).save(folder / f"{i:05d}.png")
Image.new("L", (3, 3), 255).save(out / "trigger.png")
print(f"{out}/model.safetensors, {out}/clean (500 PNGs), {out}/test (2000 PNGs), {out}/trigger.png")
EOF

echo "== 3. one command"
python3 defense/ulrl.py --model "$model" --model_file "$out/model.safetensors" \
  --clean_dir "$out/clean" --test_dir "$out/test" --dataset fashion_mnist --ratio 1 \
  --trigger_patch "$out/trigger.png" --target_label 0 --output_dir "$out/purified" \
  2>&1 | grep -E "flagged|C-ACC|before|after|results in"

echo "== 4. one function call"
python3 - "$out" "$model" <<'EOF'
import sys

import torch
from torchvision import datasets, transforms

from defense.ulrl import purify
from models import build_model, load_aligned, read_state_dict
from utils.data.datasets import get_dataset
from utils.data.triggers import paste

out, name = sys.argv[1], sys.argv[2]
model = build_model(name, 10, in_channels=1, image_size=28)
load_aligned(model, read_state_dict(f"{out}/model.safetensors"), "the weights in model.safetensors")
grey = transforms.Compose([transforms.Grayscale(), transforms.PILToTensor()])
clean = datasets.ImageFolder(f"{out}/clean", transform=grey)
test = datasets.ImageFolder(f"{out}/test", transform=grey)
x = torch.stack([image for image, _ in test])
y = torch.tensor([int(test.classes[label]) for _, label in test])
triggered = paste(x, torch.full((1, 3, 3), 255, dtype=torch.uint8), 25, 25)
spec = get_dataset("fashion_mnist")
purified, report = purify(model, clean, mean=spec.mean, std=spec.std, test=(x, y),
                          backdoor_test=(triggered, y), target_label=0, relearn_lr=0.01, alpha=0.1)
print("flagged", [f["neuron"] for f in report["flagged_neurons"]])
for phase in ("before", "after"):
    m = report[phase]
    print(f"{phase:<7} C-ACC {100 * m['test_acc']:.2f}%  ASR {100 * m['test_asr']:.2f}%  "
          f"RA {100 * m['test_ra']:.2f}%")
EOF
