"""Benchmark ULRL: median per-phase wall time, throughput, peak memory, and the speed-up over the
public code's schedule (full clean + backdoor test evaluation after every epoch of both phases).

    # a synthetic CIFAR-10-sized job: random images, a randomly initialized model, 50,000 clean
    # training images (1 % = 500 defense images), 10,000 clean and 9,000 backdoor test images
    python bench/ulrl_bench.py --synthetic cifar10 --model preactresnet18 --repeats 3
    # a real record (any ULRL option after the bench's own is passed through)
    python bench/ulrl_bench.py --result_file demo_badnet_fashion_mnist \
        --yaml_path config/defense/ulrl/fashion_mnist.yaml

A synthetic model is random, so it would stop unlearning at once; the bench fixes the unlearning
length instead (--unlearning_epochs, default 5, with clean_threshold -1). The public schedule is run
and timed once (--public measure), or, where that is too slow (a full-width model on a CPU),
estimated as the fast run plus one timed full evaluation per epoch (--public estimate).
It is a benchmark, not a test: it asserts nothing and prints a table.
"""
from __future__ import annotations

import argparse
import logging
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from defense.ulrl import OPTIONS as ULRL_OPTIONS, main as ulrl_main  # noqa: E402
from models import build_model  # noqa: E402
from utils.core.cli import log, setup_console_logging  # noqa: E402
from utils.data.datasets import DatasetSpec, from_arrays, get_dataset, register_dataset  # noqa: E402
from utils.data.images import ImageSet  # noqa: E402
from utils.data.record import save_attack_record  # noqa: E402

PHASES = ("load", "evaluation_before", "unlearning", "scoring", "relearning", "evaluation_after")


def synthetic_record(root: Path, like: str, model: str) -> tuple[str, Path]:
    """A record of the same shapes as `like` (a registered data set) with random content."""
    spec = get_dataset(like)
    name = f"synthetic_{like}"
    h, w, c = spec.image_size
    sizes = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "gtsrb": (39209, 12630),
             "tiny": (100000, 10000)}.get(like, (60000, 10000))

    def load(folder, train):
        n = sizes[0] if train else sizes[1]
        gen = torch.Generator().manual_seed(int(train))
        return from_arrays(
            torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=gen).numpy(),
            torch.randint(0, spec.num_classes, (n,), generator=gen).numpy())

    register_dataset(DatasetSpec(name, spec.num_classes, spec.image_size, spec.mean, spec.std,
                                 spec.hflip, load))
    (root / "data" / name).mkdir(parents=True)
    test = load(None, False).subset()
    keep = (test.labels != 0).nonzero().flatten()[:9000]
    images = test.images[keep].clone()
    images[..., -3:, -3:] = 255  # a BadNets-style patch, as PNGs on disk like a real record
    bd_test = ImageSet(images, torch.zeros(len(keep), dtype=torch.long), test.labels[keep],
                       torch.ones(len(keep), dtype=torch.bool), keep)
    state = build_model(model, spec.num_classes, in_channels=c, image_size=h).state_dict()
    save_attack_record(root / "record" / name, model_name=model, num_classes=spec.num_classes,
                       state_dict=state, clean_data=name, img_size=spec.image_size, bd_train=None,
                       bd_test=bd_test, train_length=sizes[0], test_length=sizes[1])
    return name, root


def run(argv: list[str], record_dir: Path, name: str) -> dict:
    ulrl_main(argv)
    return json.loads((record_dir / name / "defense/ulrl/summary.json").read_text())


def median_times(summaries: list[dict]) -> dict:
    return {p: statistics.median(s["times_s"].get(p, 0.0) for s in summaries)
            for p in (*PHASES, "total")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synthetic", help="benchmark a random record shaped like this data set")
    parser.add_argument("--model", default="preactresnet18", help="model of a synthetic record")
    parser.add_argument("--result_file", help="benchmark this record instead")
    parser.add_argument("--record_dir", default=ULRL_OPTIONS["record_dir"].default)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unlearning_epochs", type=int, default=5,
                        help="fixed unlearning length of a synthetic run")
    parser.add_argument("--public", choices=("measure", "estimate", "skip"), default="measure")
    parser.add_argument("--json", help="also write the results to this file")
    args, ulrl_args = parser.parse_known_args()
    setup_console_logging()
    log.setLevel(logging.WARNING)  # the bench prints its own table
    if bool(args.synthetic) == bool(args.result_file):
        parser.error("give exactly one of --synthetic DATASET and --result_file NAME")

    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            name, root = synthetic_record(Path(tmp), args.synthetic, args.model)
            record_dir = root / "record"
            ulrl_args = ["--dataset_path", str(root / "data"), "--clean_threshold", "-1",
                         "--unlearning_epochs", str(args.unlearning_epochs), *ulrl_args]
        else:
            name, record_dir = args.result_file, Path(args.record_dir)
        argv = ["--result_file", name, "--record_dir", str(record_dir), *ulrl_args]
        runs = []
        for i in range(args.repeats):
            runs.append(run(argv, record_dir, name))
            print(f"run {i + 1}/{args.repeats}: {runs[-1]['times_s']['total']:.2f} s", flush=True)
        public = None
        if args.public == "measure":
            public = run([*argv, "--eval_every_epoch"], record_dir, name)["times_s"]["total"]
    report(args, name, runs, public)


def report(args, name: str, runs: list[dict], public_measured: float | None) -> None:
    times, last = median_times(runs), runs[-1]
    epochs = last["unlearning"]["epochs"] + last["relearning"]["epochs"]
    n_def = last["defense_samples"]
    env = last["environment"]
    print(f"\nULRL benchmark: {name} ({last['model']}), {args.repeats} runs, median seconds")
    print(f"device {env['device']} ({env.get('gpu') or env.get('cpu')}), torch {env['torch']}, "
          f"{env['threads']} CPU threads; {n_def} defense images, epochs {epochs} "
          f"({last['unlearning']['epochs']} unlearning + {last['relearning']['epochs']} relearning)")
    for phase in (*PHASES, "total"):
        print(f"  {phase:<18} {times[phase]:9.3f}")
    train_time = times["unlearning"] + times["relearning"]
    eval_time = times["evaluation_after"]
    n_eval = last.get("test_samples")
    print(f"  training throughput  {epochs * n_def / train_time:9.0f} images/s")
    if n_eval:
        print(f"  evaluation throughput {n_eval / eval_time:8.0f} images/s")
    peak = last["peak_memory_mib"]
    print(f"  peak memory          RSS {peak['rss']:.0f} MiB"
          + (f", CUDA {peak['cuda']:.0f} MiB" if "cuda" in peak else ""))
    result = {"record": name, "median_s": times, "runs": [r["times_s"] for r in runs],
              "environment": env, "peak_memory_mib": peak, "epochs": epochs}
    if args.public != "skip":
        kind = "measured"
        public = public_measured
        if public is None:  # one full evaluation of both test sets after every epoch
            kind, public = "estimated", times["total"] + epochs * eval_time
        print(f"  public schedule (--eval_every_epoch) {public:9.3f} s ({kind}): "
              f"{public / times['total']:.1f}x slower")
        result.update(public_s=public, public_kind=kind, speedup=public / times["total"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
