"""Per-channel BatchNorm2d masks, shared by ANP and RNP.

`mask_batchnorms(model)` swaps every BatchNorm2d of a working copy of the model for a
`MaskedBatchNorm2d` whose output is BN(x; gamma * m, beta), or, with ANP's neuron perturbation switched
on, BN(x; gamma * (m + delta), beta * (1 + xi)). Only m (and delta, xi) train; the model's own weights
are frozen. Channels are named by the BatchNorm2d's dotted module name and index, so the masks learned
on the copy prune the ORIGINAL model: `prune_channels` sets gamma (and optionally beta) of the chosen
channels to zero. `choose_threshold` picks the pruning threshold from the defense subset alone.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from utils.core.cli import log
from utils.core.errors import UserError
from utils.training.train import accuracy, eval_batch_size, predict


class MaskedBatchNorm2d(nn.Module):
    """Wraps a BatchNorm2d (kept as `bn`, buffers and all) with a mask m (init 1) and ANP's
    multiplicative noise on gamma (`weight_noise`) and beta (`bias_noise`), used while `perturbed`."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.bn = bn
        like = dict(device=bn.weight.device, dtype=bn.weight.dtype)
        self.mask = nn.Parameter(torch.ones(bn.num_features, **like))
        self.weight_noise = nn.Parameter(torch.zeros(bn.num_features, **like))
        self.bias_noise = nn.Parameter(torch.zeros(bn.num_features, **like))
        self.perturbed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mask, self.bn.bias
        if self.perturbed:
            scale, shift = self.mask + self.weight_noise, self.bn.bias * (1 + self.bias_noise)
        # functional_call keeps BatchNorm2d's own logic (batch vs running statistics, momentum,
        # num_batches_tracked) and only substitutes the affine parameters.
        return functional_call(self.bn, {"weight": self.bn.weight * scale, "bias": shift}, (x,))


def mask_batchnorms(model: nn.Module, method: str) -> dict[str, MaskedBatchNorm2d]:
    """Replace every BatchNorm2d of `model` (a working copy: it is changed in place) by a masked one
    and freeze the model's own parameters. Returns {module name: masked layer}."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not names:
        raise UserError(f"{method.upper()} masks BatchNorm2d channels but {type(model).__name__} has "
                        "no BatchNorm2d layer: use a defense that does not need BatchNorm "
                        "(e.g. I-BAU or ULRL)")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in names:
        bn = model.get_submodule(name)
        if not bn.affine:
            raise UserError(f"BatchNorm2d '{name}' has no affine parameters (affine=False), so its "
                            f"channels cannot be masked or pruned by {method.upper()}")
        parent, _, child = name.rpartition(".")
        layers[name] = MaskedBatchNorm2d(bn)
        setattr(model.get_submodule(parent), child, layers[name])
    return layers


def mask_parameters(layers: dict[str, MaskedBatchNorm2d]) -> list[nn.Parameter]:
    return [layer.mask for layer in layers.values()]


def noise_parameters(layers: dict[str, MaskedBatchNorm2d]) -> list[nn.Parameter]:
    return [p for layer in layers.values() for p in (layer.weight_noise, layer.bias_noise)]


def set_perturbed(layers: dict[str, MaskedBatchNorm2d], perturbed: bool) -> None:
    for layer in layers.values():
        layer.perturbed = perturbed


@torch.no_grad()
def clamp_masks(layers: dict[str, MaskedBatchNorm2d]) -> None:
    for layer in layers.values():
        layer.mask.clamp_(0, 1)


def mask_values(layers: dict[str, MaskedBatchNorm2d]) -> dict[str, torch.Tensor]:
    return {name: layer.mask.detach().float().cpu().clone() for name, layer in layers.items()}


def rounded(masks: dict[str, torch.Tensor], digits: int = 4) -> dict[str, list[float]]:
    """Masks as plain lists for summary.json."""
    return {name: [round(v, digits) for v in m.tolist()] for name, m in masks.items()}


def channels_at_or_below(masks: dict[str, torch.Tensor], threshold: float) -> dict[str, list[int]]:
    """{layer: channel indices with mask <= threshold} (the public codes prune m <= t), layers with
    none left out."""
    found = {name: torch.nonzero(m <= threshold).flatten().tolist() for name, m in masks.items()}
    return {name: idx for name, idx in found.items() if idx}


@torch.no_grad()
def prune_channels(model: nn.Module, channels: dict[str, list[int]], zero_beta: bool = False) -> int:
    """Set gamma of the listed BatchNorm2d channels of `model` to zero (and beta with `zero_beta`,
    which silences the channel; with gamma = 0 alone its output is the constant beta).
    Returns the number of channels pruned."""
    for name, idx in channels.items():
        bn = model.get_submodule(name)
        bn.weight[idx] = 0
        if zero_beta:
            bn.bias[idx] = 0
    return sum(len(idx) for idx in channels.values())


def defense_accuracy(run, model: nn.Module) -> float:
    """Accuracy of `model` on the run's defense subset (eval mode, no augmentation)."""
    data = run.defense_data
    batch = eval_batch_size(run.cfg.eval_batch_size, run.device)
    return accuracy(predict(model, data, run.preprocess, batch, run.cfg.amp), data.labels)


def choose_threshold(model: nn.Module, original_state: dict, masks: dict[str, torch.Tensor],
                     thresholds: list[float], defense_accuracy, acc_drop: float,
                     zero_beta: bool = False) -> dict:
    """Prune `model` (reloaded from `original_state`) at the LARGEST candidate threshold whose pruned
    model keeps defense-subset accuracy >= (1 - acc_drop) x the unpruned model's. If none does,
    the candidate with the highest defense accuracy (smallest threshold on ties) is used, with a
    warning. `defense_accuracy(model) -> float` sees only the defense subset, never a test set.
    Leaves `model` pruned at the chosen threshold and returns the choice and the whole table."""
    model.load_state_dict(original_state)
    base = defense_accuracy(model)
    floor = (1 - acc_drop) * base
    table = []
    for t in sorted(set(thresholds)):
        model.load_state_dict(original_state)
        pruned = prune_channels(model, channels_at_or_below(masks, t), zero_beta)
        table.append({"threshold": t, "pruned_channels": pruned,
                      "defense_acc": defense_accuracy(model)})
    passing = [row for row in table if row["defense_acc"] >= floor]
    if passing:
        chosen = passing[-1]
    else:
        chosen = max(table, key=lambda row: (row["defense_acc"], -row["threshold"]))
        log.warning("no threshold keeps defense accuracy >= %.4f (%.0f%% of %.4f): using %.2f, the "
                    "most accurate candidate", floor, 100 * (1 - acc_drop), base,
                    chosen["threshold"])
    model.load_state_dict(original_state)
    channels = channels_at_or_below(masks, chosen["threshold"])
    prune_channels(model, channels, zero_beta)
    log.info("threshold %.2f: %d of %d BatchNorm channels pruned, defense accuracy %.4f (unpruned "
             "%.4f, floor %.4f)", chosen["threshold"], chosen["pruned_channels"],
             sum(len(m) for m in masks.values()), chosen["defense_acc"], base, floor)
    return {"threshold": chosen["threshold"], "within_accuracy_budget": bool(passing),
            "pruned_channels": chosen["pruned_channels"], "pruned": channels,
            "defense_acc_unpruned": base, "defense_acc_floor": floor, "table": table}
