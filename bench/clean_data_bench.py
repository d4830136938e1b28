"""Benchmark a defense run's setup (DefenseRun's load phase: the record, its backdoor test set, the
clean data, the defense subset and, with --retune_check, the retuning set): wall time, peak memory
and how many image files were opened, each in a fresh process.

    python bench/clean_data_bench.py --dataset fashion_mnist     # the installed Fashion-MNIST
    python bench/clean_data_bench.py --dataset tiny              # a generated Tiny-ImageNet folder

The record is made once under --work (random smallcnn weights; a white-square trigger on 10 % of
the training images and on --bd_test test images, PNG trees as BackdoorBench writes them). For
`tiny` the data set is generated there too: --classes x --per_class training JPEGs (64x64) and
10 validation images per class, in the re-foldered val layout. It is a benchmark, not a test: it
asserts nothing and prints one JSON line per repeat and the medians.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from models import build_model  # noqa: E402
from utils.data.datasets import get_dataset, load_clean_dataset  # noqa: E402
from utils.data.images import ImageSet  # noqa: E402
from utils.data.record import save_attack_record  # noqa: E402


def make_tiny(root: Path, classes: int, per_class: int) -> None:
    """Tiny-ImageNet's layout with smooth random 64x64 JPEGs (8x8 noise, upsampled)."""
    rng = np.random.default_rng(0)
    folder = root / "tiny-imagenet-200"
    for split, count in (("train", per_class), ("val", 10)):
        for c in range(classes):
            d = folder / split / f"n{c:08d}" / "images"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                small.resize((64, 64), Image.Resampling.BILINEAR).save(d / f"n{c:08d}_{i}.JPEG")


def poisoned(clean: ImageSet, index: torch.Tensor, flags: torch.Tensor) -> ImageSet:
    images = clean.images[index].clone()
    images[flags, :, -4:, -4:] = 255
    true = clean.labels[index]
    return ImageSet(images, torch.where(flags, torch.zeros_like(true), true), true.clone(),
                    flags, index)


def make_record(work: Path, name: str, data_path: Path, bd_test: int) -> Path:
    spec = get_dataset(name)
    train = load_clean_dataset(name, data_path, train=True)
    test = load_clean_dataset(name, data_path, train=False)
    gen = torch.Generator().manual_seed(0)
    train_flags = torch.rand(len(train), generator=gen) < 0.1
    keep = (test.labels != 0).nonzero().flatten()[:bd_test]
    h, w, c = spec.image_size
    torch.manual_seed(0)
    state = build_model("smallcnn", spec.num_classes, in_channels=c, image_size=h).state_dict()
    folder = work / "record" / f"bench_{name}"
    save_attack_record(folder, model_name="smallcnn", num_classes=spec.num_classes,
                       state_dict=state, clean_data=name, img_size=spec.image_size,
                       bd_train=poisoned(train, torch.arange(len(train)), train_flags),
                       bd_test=poisoned(test, keep, torch.ones(len(keep), dtype=torch.bool)),
                       train_length=len(train), test_length=len(test))
    return folder


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MiB. Not getrusage's ru_maxrss: Linux
    carries that across exec, so a child would report its parent's peak."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def measure(args) -> dict:
    """One defense-run setup in this process: the numbers the parent collects."""
    from utils.core.cli import log, setup_console_logging
    from utils.core.config import parse_config
    from utils.defenses.run import DEFENSE_OPTIONS, DefenseRun
    opened = [0]
    real_open = Image.open

    def counting_open(*a, **k):
        opened[0] += 1
        return real_open(*a, **k)
    Image.open = counting_open
    setup_console_logging()
    log.setLevel("WARNING")
    baseline = _status_mib("VmRSS")
    argv = ["--result_file", args.record.name, "--record_dir", str(args.record.parent),
            "--dataset_path", str(args.data_path), "--device", "cpu", "--ratio", str(args.ratio),
            "--plots", "false"] + (["--retune_check"] if args.retune_check else [])
    with DefenseRun(parse_config(DEFENSE_OPTIONS, "bench", argv), "bench") as run:
        load_s = run.times["load"]
        sizes = {"defense": len(run.defense_data), "bd_test": len(run.bd_test),
                 "retune": len(run.retune_set) if args.retune_check else 0}
    peak = _status_mib("VmHWM")
    return {"load_s": round(load_s, 3), "peak_rss_mib": round(peak),
            "rss_above_imports_mib": round(peak - baseline), "image_files_opened": opened[0],
            **sizes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("fashion_mnist", "tiny"), default="fashion_mnist")
    p.add_argument("--work", type=Path, default=Path("/tmp/clean_data_bench"))
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--per_class", type=int, default=50)
    p.add_argument("--bd_test", type=int, default=1000)
    p.add_argument("--ratio", type=float, default=None,
                   help="defense share (default 0.01; tiny: 0.02, one image per class)")
    p.add_argument("--retune_check", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data_path", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    args.ratio = args.ratio or (0.02 if args.dataset == "tiny" else 0.01)
    data_path = args.work / "data"
    if args.dataset == "tiny" and not (data_path / "tiny").is_dir():
        make_tiny(data_path / "tiny", args.classes, args.per_class)
    data_path.mkdir(parents=True, exist_ok=True)
    record = args.work / "record" / f"bench_{args.dataset}"
    if not (record / "attack_result.pt").is_file():
        record = make_record(args.work, args.dataset, data_path, args.bd_test)
    runs = []
    for _ in range(args.repeats):
        cmd = [sys.executable, __file__, "--measure", "--record", str(record), "--data_path",
               str(data_path), "--ratio", str(args.ratio)] + \
              (["--retune_check"] if args.retune_check else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]))
    print("median:", json.dumps({k: statistics.median(r[k] for r in runs) for k in runs[0]}))


if __name__ == "__main__":
    main()
