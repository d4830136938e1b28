"""FT: plain fine-tuning of every weight with cross-entropy on the defense subset.

    python defense/ft.py --result_file badnet_0_1 --yaml_path config/defense/ft/cifar10.yaml

BackdoorBench's FT settings: SGD lr 0.01, momentum 0.9, weight decay 5e-4, CosineAnnealingLR,
batch 256, 100 epochs (200 on Tiny-ImageNet). Differences from BackdoorBench: 1 % defense data
by default (its yaml has 5 %; the ULRL paper uses 1 % for every defense); Tiny-ImageNet keeps the
cosine schedule instead of ReduceLROnPlateau; no test evaluation inside the loop (before and after
only, --eval_every_epoch restores it).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.core.cli import main_guard  # noqa: E402
from utils.core.config import parse_config  # noqa: E402
from utils.defenses.finetune import FINETUNE_OPTIONS, finetune  # noqa: E402
from utils.defenses.run import DEFENSE_OPTIONS, run_defense  # noqa: E402
from utils.defenses.session import DefenseSession, python_api  # noqa: E402

OPTIONS = {**DEFENSE_OPTIONS, **FINETUNE_OPTIONS}


def defend(run: DefenseSession) -> dict:
    """Fine-tune every weight on the defense subset."""
    return {"finetune": run.timed("finetune", finetune, run, run.model, run.batches())}


purify = python_api(OPTIONS, defend, "ft")  # the Python API


def main(argv=None):
    cfg = parse_config(OPTIONS, "FT: fine-tune a BackdoorBench attack record on clean data", argv)
    return run_defense(cfg, "ft", defend)


if __name__ == "__main__":
    main_guard(main)
