"""Issue 16 experiment: the "sink" classes of ULRL's unlearning, and relearning with chosen neurons.

    python bench/ulrl_sinks.py RECORD_FOLDER [--rounds 4] [--reinit 6,0 --reinit 0 ...]

Unlearning (Algorithm 2, the record data set's yaml settings, 1 % defense subset with seed 0)
drives every defense image into one class, the sink, whose classifier row then moves most. Round r
masks the sinks of rounds 0..r-1 (their logits pinned at -1e4, as `ulrl --mode robust` does) and
unlearns again from the record's weights, printing the next sink and the top scores. --reinit runs
Algorithm 3 (reinitialize the listed neurons, relearn with the cosine penalty) and prints C-ACC,
ASR and RA on the record's test sets. Defaults: Fashion-MNIST's yaml (relearn_lr 0.01, alpha 0.1;
--relearn_lr, --alpha). Measured on this project's small-CNN Blind and TrojanNN records, where ULRL
fails, in results/fashion_mnist_smallcnn/sinks.md.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defense import ulrl  # noqa: E402
from models import build_model, input_channels  # noqa: E402
from utils.core.config import config_from  # noqa: E402
from utils.data.datasets import clean_split, get_dataset  # noqa: E402
from utils.data.record import load_attack_record  # noqa: E402
from utils.defenses.session import RECORD_OPTIONS, ModelSession  # noqa: E402
from utils.defenses.unlearning import masked_classes, unlearn  # noqa: E402
from utils.training.train import backdoor_metrics, predict  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.1, help="relearning penalty weight")
    parser.add_argument("--relearn_lr", type=float, default=0.01)
    parser.add_argument("--reinit", action="append", default=[],
                        help="comma-separated neurons to reinitialize and relearn (repeatable)")
    args = parser.parse_args(argv)
    record = load_attack_record(args.record)
    spec = get_dataset(record.clean_data)
    train = clean_split(spec.name, "./data", train=True)
    data = train.subset(random.Random(0).sample(range(len(train)), int(len(train) * 0.01)))
    options = {k: v for k, v in ulrl.OPTIONS.items() if k not in RECORD_OPTIONS}
    cfg = config_from(options, dict(relearn_lr=args.relearn_lr, alpha=args.alpha),
                      "bench/ulrl_sinks.py")
    channels = input_channels(record.state_dict)

    def session() -> ModelSession:
        model = build_model(record.model_name, record.num_classes, channels, spec.image_size[0])
        model.load_state_dict(record.state_dict)
        return ModelSession(cfg, model, data.with_channels(channels), spec.mean, spec.std,
                            spec.hflip)

    masked: list[int] = []
    for _ in range(args.rounds):
        s = session()
        linear = s.linear
        handle = masked_classes(linear, masked)  # unlearning cannot collapse into these
        w_pre = linear.weight.detach().clone()
        unlearn(s.model, s.batches(), cfg)
        scores = (linear.weight.detach() - w_pre).abs().sum(1)
        counts = torch.bincount(predict(s.model, s.defense_data, s.preprocess),
                                minlength=record.num_classes)
        handle.remove()
        sink = int(counts.argmax())
        top = [(int(j), round(float(scores[j]), 2)) for j in scores.argsort(descending=True)[:3]]
        print(f"masked {masked}: sink {sink} ({int(counts[sink])}/{len(data)}), top scores {top}")
        masked.append(sink)

    test = clean_split(spec.name, "./data", train=False).subset()
    bd_test = record.bd_test.images(test)
    for text in args.reinit:
        neurons = [int(n) for n in text.split(",")]
        s = session()
        linear = s.linear
        ulrl.reinitialize_and_relearn(s.model, linear, s.batches(), neurons, cfg)  # seed 0
        metrics = backdoor_metrics(s.model, test.with_channels(channels).to(s.device),
                                   bd_test.with_channels(channels).to(s.device), s.preprocess)
        print(f"reinitialized {neurons}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
