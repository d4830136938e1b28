"""FP: Fine-Pruning (Liu, Dolan-Gavitt and Garg, 2018): prune the channels of the last convolutional
feature map that clean data activate least, then fine-tune.

    python defense/fp.py --result_file badnet_0_1 --yaml_path config/defense/fp/cifar10.yaml

1. The feature map is found by structure: the last 4-D tensor a module outputs before the
   classifier runs (PreAct-ResNet18 / ResNet-18: the pooled layer4 output, 512 channels; VGG19-BN:
   the pooled features, 512 channels; smallcnn: the pooled last conv block, 64 channels). Its first
   reader must be an nn.Linear over the flattened map (vit_b_16's classifier reads transformer
   tokens: FP does not apply and says so).
2. Mean activation of every channel over the defense subset (eval mode, no augmentation).
3. Channels are pruned in ascending order of that mean, ceil(prune_step x channels) at a time.
   Pruning a channel zeroes the columns of the reading Linear that carry it, which is exactly
   zeroing the channel for the rest of the network and, unlike a forward hook or torch's
   prune reparametrization, is an ordinary state dict that loads anywhere.
4. Stopping point, chosen on the defense subset only (never on a test set): after each step the
   pruned model's defense-subset accuracy (eval mode) is measured; pruning stops at the first step
   whose accuracy falls below the bound and keeps the step before it. --prune_rule relative
   (default, BackdoorBench's rule): bound = (1 - acc_drop) x the unpruned accuracy, acc_drop 0.1;
   --prune_rule absolute (the ULRL paper's "until C-ACC < 80 %"): bound = min_acc, 0.8. At least one
   channel always stays. summary.json records the rule, the bound, the accuracy after every step,
   the chosen count and the pruned channel list (with --curve_samples N also C-ACC / ASR / RA of
   every step on N test images, for plots only: they play no part in the choice).
5. Fine-tune every weight (utils/defenses/finetune.py: SGD lr 0.01, momentum 0.9, wd 5e-4, cosine, batch 256,
   100 epochs, BackdoorBench's and the paper's settings); the pruned columns are set back to zero
   after every step, so they are exactly zero in the saved model.

Differences from BackdoorBench's FP: it picks the stopping point on the clean TEST set; it prunes
the input features of the model's last child (for VGG19-BN the 25,088 flattened positions, for
smallcnn the 128 hidden units) where this prunes conv channels; it prunes one channel fewer than it
reports (`seq_sort[0:num_pruned - 1]`), keeps the over-pruned model that broke the rule (its "last
good" model is the same object, pruned further in place), and saves a state dict with `weight_orig`
/ `weight_mask` keys that a plain model does not load. 1 % defense data (its yaml: 5 %).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from utils.core.cli import log, main_guard  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402
from utils.core.errors import UserError  # noqa: E402
from utils.defenses.finetune import FINETUNE_OPTIONS, finetune  # noqa: E402
from utils.defenses.run import DEFENSE_OPTIONS, run_defense  # noqa: E402
from utils.defenses.session import DefenseSession, python_api  # noqa: E402
from utils.training.train import accuracy, eval_batch_size, predict  # noqa: E402

OPTIONS = {
    **DEFENSE_OPTIONS, **FINETUNE_OPTIONS,
    "prune_rule": Option("relative", "when pruning stops, measured on the defense subset: "
                         "'relative' (accuracy below (1 - acc_drop) x unpruned, BackdoorBench) or "
                         "'absolute' (accuracy below min_acc, the ULRL paper)",
                         choices=("relative", "absolute")),
    "acc_drop": Option(0.1, "relative rule: largest allowed relative drop of defense accuracy",
                       bounds="[0, 1)"),
    "min_acc": Option(0.8, "absolute rule: lowest allowed defense accuracy", bounds="[0, 1]"),
    "prune_step": Option(0.01, "share of the channels pruned per step (BackdoorBench's "
                               "once_prune_ratio); at least one channel", bounds="(0, 1]"),
}


# ---------------------------------------------------------------- the pruned feature map
def find_feature_map(model: nn.Module, classifier: nn.Linear, example: torch.Tensor):
    """(name of the module that outputs the last 4-D feature map before the classifier, its
    [C, H, W], name and module of the nn.Linear that reads it flattened), found by one forward
    pass over `example` with hooks."""
    events, handles = [], []  # (kind, name, module, shape) in call order
    for name, module in model.named_modules():
        if module is model:
            continue
        handles.append(module.register_forward_hook(
            lambda m, i, out, name=name: events.append(
                ("out", name, m, tuple(out.shape) if torch.is_tensor(out) else ()))))
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(
                lambda m, i, name=name: events.append(("in", name, m, tuple(i[0].shape)))))
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    call = next((i for i, e in enumerate(events) if e[0] == "in" and e[2] is classifier), None)
    if call is None:
        raise UserError("the classifier layer never ran in a forward pass: check --linear_name")
    maps = [i for i in range(call) if events[i][0] == "out" and len(events[i][3]) == 4]
    tokens = [i for i in range(maps[-1] + 1 if maps else 0, call)
              if events[i][0] == "out" and len(events[i][3]) == 3]
    if not maps or tokens:
        raise UserError("FP prunes channels of the last convolutional feature map before the "
                        "classifier, but this model's classifier reads "
                        f"{'transformer tokens' if tokens else 'no 4-D feature map'}: "
                        "use another defense (e.g. ft or fst) for this model")
    _, feature_name, _, shape = events[maps[-1]]
    channels, height, width = shape[1:]
    reader = next((e for e in events[maps[-1] + 1:call + 1] if e[0] == "in"), None)
    if reader is None or reader[2].in_features != channels * height * width:
        raise UserError(f"FP needs the feature map of '{feature_name}' {tuple(shape[1:])} to be "
                        "read, flattened, by an nn.Linear; this model's first reader is "
                        f"{'none' if reader is None else repr(reader[1])}: use another defense")
    return feature_name, (channels, height, width), reader[1], reader[2]


def channel_activation(model, module: nn.Module, data, preprocess, batch_size: int, amp: bool):
    """Mean over images and positions of every channel of `module`'s output (eval mode), and the
    model's accuracy on `data` from the same pass."""
    total = []

    def record(m, i, out):
        total.append(out.float().mean((2, 3)).sum(0))

    handle = module.register_forward_hook(record)
    try:
        pred = predict(model, data, preprocess, batch_size, amp)
    finally:
        handle.remove()
    return torch.stack(total).sum(0) / len(data), accuracy(pred, data.labels)


def column_mask(pruned: torch.Tensor, channels: int, positions: int, like: torch.Tensor):
    """[1, channels * positions] mask of the reading Linear's input columns: 0 for every position of
    a pruned channel (torch.flatten order: channel-major), 1 elsewhere."""
    mask = torch.ones(channels, positions, dtype=like.dtype, device=like.device)
    mask[pruned.to(like.device)] = 0
    return mask.view(1, -1)


def accuracy_bound(cfg, unpruned_acc: float) -> float:
    """The lowest defense-subset accuracy a pruning step may reach (see the module docstring)."""
    if cfg.prune_rule == "relative":
        return (1 - cfg.acc_drop) * unpruned_acc
    return cfg.min_acc


def choose_pruning(order: torch.Tensor, step: int, bound: float, acc_after) -> tuple[int, list]:
    """Prune `step` more channels of `order` at a time while acc_after(k) (defense accuracy with
    the first k pruned) stays >= bound; returns the kept count and the (k, accuracy) curve. At
    least one channel always stays."""
    chosen, curve = 0, []
    for k in range(step, len(order), step):
        acc = acc_after(k)
        curve.append((k, acc))
        if acc < bound:
            break
        chosen = k
    return chosen, curve



def defend(run: DefenseSession) -> dict:
    """Prune the least active channels of the last feature map within the accuracy rule, then
    fine-tune with the pruned weights held at zero."""
    cfg = run.cfg
    model, data = run.model, run.defense_data
    example = run.preprocess(data.images[:2])
    feature_name, (channels, height, width), reader_name, reader = find_feature_map(
        model, run.linear, example)
    batch = eval_batch_size(cfg.eval_batch_size, run.device)
    activation, unpruned_acc = run.timed(
        "activation", channel_activation, model, model.get_submodule(feature_name), data,
        run.preprocess, batch, cfg.amp)
    order = torch.argsort(activation.cpu(), stable=True)  # least active first
    bound = accuracy_bound(cfg, unpruned_acc)
    w_reader = reader.weight.detach().clone()

    def prune(k: int) -> torch.Tensor:
        mask = column_mask(order[:k], channels, height * width, w_reader)
        with torch.no_grad():
            reader.weight.copy_(w_reader * mask)
        return mask

    curve_metrics = {}  # with --curve_samples: test metrics per step, logged, never used

    def acc_after(k: int) -> float:
        prune(k)
        if cfg.curve_samples > 0:
            curve_metrics[k] = run.evaluate(model, run.curve_sets)
        return accuracy(predict(model, data, run.preprocess, batch, cfg.amp), data.labels)

    step = max(1, math.ceil(channels * cfg.prune_step))
    chosen, curve = run.timed("pruning", choose_pruning, order, step, bound, acc_after)
    mask = prune(chosen)
    pruned = order[:chosen].tolist()
    log.info("feature map '%s' %s read by '%s': pruned %d of %d channels (defense accuracy "
             "%.4f unpruned, bound %.4f by the %s rule, %.4f at the chosen count)",
             feature_name, (channels, height, width), reader_name, chosen, channels,
             unpruned_acc, bound, cfg.prune_rule, dict(curve).get(chosen, unpruned_acc))
    if chosen == 0:
        log.warning("no channel could be pruned within the %s rule: FP is plain fine-tuning "
                    "here", cfg.prune_rule)

    def keep_pruned():
        with torch.no_grad():
            reader.weight.mul_(mask)

    finetuning = run.timed("finetune", lambda: finetune(run, model, run.batches(),
                                                        after_step=keep_pruned))
    return {
        "pruning": {"feature_map": feature_name, "shape": [channels, height, width],
                    "reader": reader_name, "rule": cfg.prune_rule, "bound": bound,
                    "unpruned_defense_acc": unpruned_acc, "step": step,
                    "curve": [{"pruned": k, "defense_acc": a,
                               **{f"curve_{m}": v for m, v in curve_metrics.get(k, {}).items()}}
                              for k, a in curve],
                    "num_pruned": chosen, "num_channels": channels,
                    "pruned_channels": pruned,
                    "activation": [round(a, 6) for a in activation.tolist()]},
        "finetune": finetuning}


purify = python_api(OPTIONS, defend, "fp")  # the Python API


def main(argv=None):
    cfg = parse_config(OPTIONS, "FP: fine-pruning of a BackdoorBench attack record", argv)
    return run_defense(cfg, "fp", defend)


if __name__ == "__main__":
    main_guard(main)
