"""Issue 16 design check for robust ULRL: does k-fold held-out accuracy track test C-ACC as alpha grows?

    python bench/ulrl_alpha_cv.py --result_file blind_fashion_mnist_smallcnn --record_dir DIR \
        --neurons 0 6 [--grid 0.1 0.2 0.3 0.5 1 3] [--folds 4]

For every alpha of the grid: the cross-validated accuracy robust mode reads (class-stratified
folds, each image held out once) and, relearned on the whole defense subset, C-ACC / ASR / RA on
the record's test sets. One row per alpha on stdout; the run's files go to defense/ulrl_alphacv/.
Any other ULRL option (e.g. --yaml_path) is passed on.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defense import ulrl  # noqa: E402
from utils.core.config import parse_config  # noqa: E402
from utils.defenses.crossval import cross_validated_accuracy  # noqa: E402
from utils.defenses.run import run_defense  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, nargs="+", required=True)
    parser.add_argument("--grid", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 1.0, 3.0])
    parser.add_argument("--folds", type=int, default=4)
    args, rest = parser.parse_known_args(argv)
    cfg = parse_config(ulrl.OPTIONS, "alpha cross-validation check",
                       [*rest, "--plots", "false", "--tag", "alphacv"])

    def defend(run):
        rows = []
        for alpha in args.grid:
            alpha_cfg = ulrl.with_alpha(cfg, alpha)
            cv = cross_validated_accuracy(run, args.folds, lambda batches: (
                ulrl.reinitialize_and_relearn(run.model, run.linear, batches, args.neurons,
                                              alpha_cfg)))
            run.model.load_state_dict(run.original_state())
            ulrl.reinitialize_and_relearn(run.model, run.linear, run.batches(), args.neurons,
                                          alpha_cfg)
            rows.append({"alpha": alpha, "cv_acc": cv, **run.evaluate()})
            print("  ".join(f"{k} {v:.4f}" for k, v in rows[-1].items()), flush=True)
        return {"neurons": args.neurons, "alpha_rows": rows}

    run_defense(cfg, "ulrl", defend)


if __name__ == "__main__":
    main()
