"""RNP: Reconstructive Neuron Pruning (Li et al., 2023), on the shared defense core.

    python defense/rnp.py --result_file badnet_0_1 --yaml_path config/defense/rnp/cifar10.yaml

1. Unlearn: gradient ascent on the defense subset with all weights trainable until the epoch's
   running train accuracy <= clean_threshold (utils/defenses/unlearning.py, ULRL's recipe: SGD lr 0.01,
   momentum 0.9, weight decay 5e-4, MultiStepLR [10, 20], at most 20 epochs).
2. Recover at filter level: on a copy of the UNLEARNED model, every BatchNorm2d output becomes
   BN(x; gamma * m, beta) with one mask m per channel (init 1); only the masks train (SGD lr 0.2,
   momentum 0.9, loss 0.2 * CE, masks clamped to [0, 1] after every step, 20 epochs, train mode).
3. Prune the ORIGINAL backdoored model: gamma = 0 for every channel with m <= t.

Choosing t (the public code only prints a table over t = 0, 0.05, ..., 0.9 scored on the TEST sets
and saves no model): among the candidate `thresholds` (default the paper's range 0.40-0.70 in steps
of 0.05) take the LARGEST whose pruned model keeps defense-subset accuracy >= (1 - acc_drop) x
the unpruned model's defense-subset accuracy (default 10 % relative, BackdoorBench's fine-pruning
rule); if none does, the candidate with the highest defense accuracy, with a warning. Only the
defense subset is used. A single value in `thresholds` prunes at that fixed threshold.
summary.json records every mask (per BatchNorm2d layer), the table of candidates, the chosen
threshold and the pruned channels; defense_result.pt holds the pruned model.

Differences from the public code (bboylyg/RNP) and the paper:
- the threshold is chosen on defense data and the pruned model is saved (above);
- the public code calls clip_grad_norm_ before backward, where it clips nothing, so `clip_norm`
  defaults to 0 (off); it also allows 21 unlearning epochs (range(0, 20 + 1)), here at most 20;
- ULRL's appendix quotes weight decay 5e-2 and "until C-ACC reached 10 %"; the public code (which
  ULRL ran) uses 5e-4 and a 0.2 train-accuracy stop, kept here;
- shared-core behaviour: tensor augmentation, no test evaluation inside the loops, bf16 on CUDA.
"""
from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils.core.cli import main_guard  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402
from utils.defenses.bn_mask import choose_threshold, clamp_masks, defense_accuracy, \
    mask_batchnorms, mask_parameters, mask_values, rounded  # noqa: E402
from utils.defenses.run import DEFENSE_OPTIONS, run_defense  # noqa: E402
from utils.defenses.session import DefenseSession, python_api  # noqa: E402
from utils.defenses.unlearning import UNLEARNING_OPTIONS, unlearn  # noqa: E402
from utils.training.train import cross_entropy, fit  # noqa: E402

OPTIONS = {
    **DEFENSE_OPTIONS,
    # step 1: unlearning, ULRL's defaults (= the public RNP code's) but for clip_norm
    **UNLEARNING_OPTIONS,
    "clip_norm": Option(0.0, "gradient-norm clipping while unlearning (0: off; the public code's "
                             "clipping runs before backward and clips nothing)", bounds=">= 0"),
    # step 2: recovering the masks
    "recovering_lr": Option(0.2, "SGD learning rate of the BatchNorm masks", bounds="> 0"),
    "recovering_momentum": Option(0.9, "SGD momentum of the masks"),
    "recovering_epochs": Option(20, "epochs of mask recovery", bounds=">= 1"),
    "mask_loss_weight": Option(0.2, "recovery loss = this x CE (the public code's alpha)", bounds="> 0"),
    # step 3: pruning
    "thresholds": Option([0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7],
                         "candidate thresholds: prune channels with mask <= t at the largest t that "
                         "keeps defense accuracy within acc_drop; one value = fixed threshold",
                         nargs="+", bounds="[0, 1]"),
    "acc_drop": Option(0.1, "largest allowed relative drop of defense-subset accuracy", bounds="[0, 1]"),
    "zero_beta": Option(False, "also set beta of pruned channels to 0 (silence them)"),
}


def recover_masks(run: DefenseSession, unlearned, batches) -> dict:
    """Train only the BatchNorm masks of a copy of the unlearned model to fit the defense subset."""
    cfg = run.cfg
    masked = copy.deepcopy(unlearned)
    layers = mask_batchnorms(masked, "rnp")
    optimizer = torch.optim.SGD(mask_parameters(layers), lr=cfg.recovering_lr,
                                momentum=cfg.recovering_momentum)
    optimizer.register_step_post_hook(lambda *_: clamp_masks(layers))  # m in [0, 1] after each step

    def loss_fn(logits, labels):
        return cfg.mask_loss_weight * cross_entropy(logits, labels)

    fit(masked, batches, optimizer, cfg.recovering_epochs, loss_fn=loss_fn, amp=cfg.amp,
        on_epoch=lambda epoch, stats, steps: run.log_epoch("recovering", epoch, stats, optimizer,
                                                            masked),
        desc="recovering")
    return mask_values(layers)



def defend(run: DefenseSession) -> dict:
    """Unlearn, recover the masks on the unlearned model, prune the original one."""
    cfg, model = run.cfg, run.model
    batches = run.batches()
    unlearning = run.timed("unlearning", unlearn, model, batches, cfg, run.log_epoch)
    masks = run.timed("recovering", recover_masks, run, model, batches)
    # Step 3 on the ORIGINAL weights (BatchNorm buffers included).
    pruning = run.timed("pruning", choose_threshold, model, run.original_state(), masks,
                        cfg.thresholds, functools.partial(defense_accuracy, run), cfg.acc_drop,
                        cfg.zero_beta)
    return {"unlearning": unlearning, "pruning": pruning, "masks": rounded(masks)}


purify = python_api(OPTIONS, defend, "rnp")  # the Python API


def main(argv=None):
    cfg = parse_config(OPTIONS, "RNP backdoor removal on a BackdoorBench attack record", argv)
    return run_defense(cfg, "rnp", defend)


if __name__ == "__main__":
    main_guard(main)
