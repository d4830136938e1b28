"""Clean test accuracy per class of a record's backdoored model and of its defended models: which
classes an attack or a defense costs (C-ACC alone hides that a clean-label attack can wipe out its
target class).

    python -m utils.per_class record/lc_fashion_mnist_smallcnn
    python -m utils.per_class record/lc_fashion_mnist_smallcnn --dataset_path ./data --out lc.csv

One row per model (the record's, then every defense/<method>/defense_result.pt), one column per
class, in %; the same table as CSV with --out.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from models import input_channels
from utils.core.cli import DEBUG_FLAG, main_guard, require, set_threads, setup_console_logging
from utils.core.io import write_csv
from utils.data.datasets import get_dataset, load_clean_dataset
from utils.data.images import Preprocess
from utils.data.record import load_attack_record, load_defense_result
from utils.training.train import accuracy, eval_batch_size, predict, record_model, resolve_device


def per_class_accuracy(model, test, preprocess, batch_size: int, num_classes: int) -> list[float]:
    pred = predict(model, test, preprocess, batch_size)
    labels = test.labels.to(pred.device)
    return [accuracy(pred[labels == c], labels[labels == c]) for c in range(num_classes)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("record", help="record folder (holding attack_result.pt)")
    parser.add_argument("--dataset_path", default="./data")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", help="also write this CSV file")
    parser.add_argument("--trust_record", action="store_true", help="UNSAFE: see defense --help")
    parser.add_argument(DEBUG_FLAG, action="store_true")
    args = parser.parse_args(argv)
    setup_console_logging()
    set_threads(0)
    folder = Path(args.record)
    require((folder / "attack_result.pt").is_file(),
            f"no attack record at {folder / 'attack_result.pt'}: pass a record folder")
    record = load_attack_record(folder, trust=args.trust_record)
    spec = get_dataset(record.clean_data)
    device = resolve_device(args.device)
    models = [("backdoored", record.state_dict)] + [
        (path.parent.name, load_defense_result(path, trust=args.trust_record)["model"])
        for path in sorted(folder.glob("defense/*/defense_result.pt"))]
    channels = input_channels(record.state_dict)
    test = load_clean_dataset(spec.name, args.dataset_path, train=False).with_channels(channels)
    test = test.to(device)
    preprocess = Preprocess(spec.mean, spec.std, channels, hflip=spec.hflip)
    rows = []
    for name, state in models:
        acc = per_class_accuracy(record_model(record, state, spec, device), test, preprocess,
                                 eval_batch_size(0, device), record.num_classes)
        rows.append({"model": name, **{f"class_{c}": round(100 * a, 2) for c, a in enumerate(acc)}})
    header = f"{'model':<14}" + "".join(f"{c:>7}" for c in range(record.num_classes))
    print(header)
    for row in rows:
        print(f"{row['model']:<14}" + "".join(f"{v:7.1f}" for k, v in row.items() if k != "model"))
    if args.out:
        write_csv(args.out, rows)


if __name__ == "__main__":
    main_guard(main)
