"""ULRL: UnLearn and ReLearn for backdoor removal (Min, Pham and Sun).

    python defense/ulrl.py --result_file badnet_0_1 --yaml_path config/defense/ulrl/cifar10.yaml

Algorithm 1 = Algorithm 2 (unlearn on the defense subset by gradient ascent, then flag the classifier
neurons whose weights moved abnormally) + Algorithm 3 (reload the original model, reinitialize the
flagged neurons, relearn with a cosine-similarity penalty pushing them away from their original
weights). Defaults follow the public code; deliberate differences are listed in the README.

Ablation switches (defaults = the method as published; --tag T writes defense/ulrl_T/ so variants
of a record sit side by side; sh/ablation_ulrl.sh sweeps them): --dispersion mad|sd|iqr (Appendix
C: z = (s - median) / (1.4826 MAD), (s - mean) / SD or (s - median) / (IQR / 1.349), each scaled to
a normal's sigma so one tau reads alike; with 10 neurons an SD z-score cannot exceed 9/sqrt(10) =
2.85, so sd never flags at tau 3.5), --regularizer cosine|inner|none (Appendix D, Table V),
--selection random --random_k K (Table VI: K seeded random neurons; unlearning still runs so the
summary shows what MAD would flag), --stop_rule epoch|step (see unlearn), plus alpha, tau, ht, ratio.
"""
from __future__ import annotations

import math
import sys
from types import SimpleNamespace
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from utils.core.cli import log, main_guard, require  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402
from utils.defenses.crossval import cross_validated_accuracy, walk_up  # noqa: E402
from utils.defenses.run import DEFENSE_OPTIONS, run_defense  # noqa: E402
from utils.defenses.session import DefenseSession, python_api  # noqa: E402
from utils.defenses.synthesis import (SYNTHESIS_OPTIONS, flip_rate, mean_features,  # noqa: E402
                                      surviving_triggers, synthesized_triggers,
                                      with_perturbed_copies)
from utils.defenses.unlearning import UNLEARNING_OPTIONS, masked_classes, unlearn  # noqa: E402
from utils.training.train import cross_entropy, eval_batch_size, fit, predict  # noqa: E402

FLAG_RULES = ("code", "paper")

OPTIONS = {
    **DEFENSE_OPTIONS,
    **UNLEARNING_OPTIONS,  # Algorithm 2: unlearning (utils/defenses/unlearning.py)
    # identification
    "dispersion": Option("mad", "outlier scale: 'mad', 'sd' or 'iqr' (Appendix C)",
                         choices=("mad", "sd", "iqr")),
    "tau": Option(3.5, "outlier threshold on the z-score (MAD threshold tau)", bounds="> 0"),
    "flag_rule": Option("code", "'code': the public code's modified z-score, (s - median) / "
                        "(1.4826 MAD) > tau, upper tail; 'paper': Algorithm 2's |s - median| > "
                        "tau x MAD, either direction, ranked by deviation (robust mode flags "
                        "both rules' outliers; this picks the scores it reports)",
                        choices=FLAG_RULES),
    "ht": Option(2, "hard cap on flagged neurons, keeping the largest scores (0: no cap)", bounds=">= 0"),
    "selection": Option("mad", "'mad': reinitialize the flagged outliers; 'random': random_k "
                        "neurons drawn with --seed (Table VI)", choices=("mad", "random")),
    "random_k": Option(2, "how many neurons --selection random reinitializes", bounds=">= 1"),
    "no_flag_action": Option("finetune", "when no neuron is flagged: 'finetune' (relearn without "
                             "the penalty, as the public code), 'top' (flag the ht largest "
                             "scores), 'stop' (keep the original model)",
                             choices=("finetune", "top", "stop")),
    # Algorithm 3: relearning (eta = relearn_lr)
    "relearn_lr": Option(0.005, "relearning learning rate (eta)", bounds="> 0"),
    "relearn_epochs": Option(20, "relearning epochs (CosineAnnealingLR over them)", bounds=">= 0"),
    "relearn_momentum": Option(0.9, "SGD momentum while relearning"),
    "regularizer": Option("cosine", "relearning penalty on the flagged neurons: 'cosine' (Eq. 3), "
                          "'inner' (FST's inner product, Appendix D) or 'none' (Table V)",
                          choices=("cosine", "inner", "none")),
    "alpha": Option(0.7, "weight of the relearning penalty", bounds=">= 0",
                    aliases=("relearn_alpha",)),
    # robust mode (not in the paper; see robust_defend)
    "mode": Option("faithful", "'faithful': Algorithms 1-3 as published; 'robust': flag both "
                   "rules' outliers and the classes unlearning collapses into (sink rounds), "
                   "choose alpha by cross-validation on the defense subset, and relearn against "
                   "a trigger synthesized from it where that trigger survives (--synth_rms, "
                   "--synth_gate)",
                   choices=("faithful", "robust")),
    "sink_rounds": Option(2, "robust mode: unlearning rounds, each masking the earlier rounds' "
                          "sinks; every round's sink is flagged", bounds=">= 1"),
    "folds": Option(4, "robust mode: class-stratified folds of the defense subset for choosing "
                    "alpha (each image is held out once)", bounds=">= 2"),
    "alpha_grid": Option([0.1, 0.2, 0.3, 0.5, 1.0], "robust mode: the alphas tried, smallest "
                         "first", nargs="+", bounds=">= 0"),
    "heldout_tolerance": Option(0.02, "robust mode: the grid is walked up while the held-out "
                                "accuracy stays at most this far below the best so far; the "
                                "last alpha within it is chosen", bounds=">= 0"),
    **SYNTHESIS_OPTIONS,  # robust mode: relearning against a synthesized trigger
}

# x spread = the standard deviation of a normal distribution, so tau reads alike for every measure
SIGMA_PER_SPREAD = {"mad": 1.4826, "sd": 1.0, "iqr": 1 / 1.349}
MEAN_AD_TO_SIGMA = 1.2533  # the same for the mean absolute deviation (used when the spread is 0)


# ---------------------------------------------------------------- Algorithm 2: scoring
def spread(scores: torch.Tensor, dispersion: str) -> tuple[torch.Tensor, str, torch.Tensor]:
    """(center, name, raw spread) of the scores: median and MAD, mean and population SD (Appendix
    C's sigma), or median and Q3 - Q1 (linear interpolation between order statistics)."""
    if dispersion == "sd":
        return scores.mean(), "SD", scores.std(correction=0)
    median = scores.median()  # the lower middle value for an even count, as the public code
    if dispersion == "iqr":
        q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75]))
        return median, "IQR", q3 - q1
    return median, "MAD", (scores - median).abs().median()


def score_neurons(w_pre: torch.Tensor, w_post: torch.Tensor, tau: float, ht: int,
                  dispersion: str = "mad", rule: str = "code") -> dict:
    """Flag classifier neurons (rows) whose weights moved abnormally far during unlearning.

    score_j = sum_k |w_post[j,k] - w_pre[j,k]|, d_j = score_j - center. Rule 'code' (the public
    code): z_j = d_j / scale with the scale of `dispersion` in sigma units (mad: 1.4826 MAD, the
    modified z-score), flagged when z_j > tau (upper tail only). Rule 'paper' (Algorithm 2, lines
    9-17): flagged when |d_j| > tau x the raw spread (MAD), in either direction. Outliers are
    ranked by the size of their deviation and the `ht` largest kept (Alg. 2 sorts by deviation;
    ties broken by the lower index). A zero spread (e.g. over half the neurons moved identically)
    falls back to the mean absolute deviation from the center (x 1.2533 in sigma units); if that
    is 0 too, nothing is an outlier."""
    scores = (w_post.float() - w_pre.float()).abs().sum(1).cpu()
    center, scale_name, raw = spread(scores, dispersion)
    deviation = scores - center
    sigma = rule == "code"  # the code scales the spread to a normal's sigma; the paper does not
    scale = SIGMA_PER_SPREAD[dispersion] * raw if sigma else raw
    if scale == 0:
        scale_name = "mean_absolute_deviation"
        scale = (MEAN_AD_TO_SIGMA if sigma else 1.0) * deviation.abs().mean()
    size = deviation if rule == "code" else deviation.abs()
    ranking = sorted(range(len(scores)), key=lambda j: (-size[j].item(), j))  # largest first
    if scale > 0:
        outliers = [j for j in ranking if size[j] / scale > tau]
    else:
        scale_name, outliers = "none (all scores equal)", []
    flagged = outliers[:ht] if ht > 0 else outliers
    tie_at_cap = 0 < ht < len(outliers) and size[outliers[ht - 1]] == size[outliers[ht]]
    median = scores.median()
    return {"scores": [round(s, 6) for s in scores.tolist()], "dispersion": dispersion,
            "rule": rule, "center": center.item(), "median": median.item(),
            "mad": (scores - median).abs().median().item(), "scale": scale_name,
            "scale_value": float(scale), "threshold": (center + tau * scale).item(),
            **({"lower_threshold": (center - tau * scale).item()} if rule == "paper" else {}),
            "ranking": ranking, "outliers": outliers, "flagged": flagged,
            "tie_at_cap": bool(tie_at_cap)}


def random_neurons(num_neurons: int, k: int, seed: int) -> list[int]:
    """Table VI's control: k distinct neurons drawn uniformly with a generator seeded by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_neurons, generator=generator)[:k].tolist())


# ---------------------------------------------------------------- Algorithm 3: relearning
def reinitialize(linear: torch.nn.Linear, neurons: list[int], generator: torch.Generator) -> None:
    """He-style reinitialization of the flagged rows: U(-sqrt(2/fan_in), +sqrt(2/fan_in)), bias 0."""
    if not neurons:
        return
    fan_in = linear.weight.shape[1]
    bound = math.sqrt(2.0 / fan_in)
    fresh = torch.empty(len(neurons), fan_in).uniform_(-bound, bound, generator=generator)
    with torch.no_grad():
        linear.weight[neurons] = fresh.to(linear.weight)
        if linear.bias is not None:
            linear.bias[neurons] = 0


def cosine_penalty(weight: torch.Tensor, neurons: list[int], w_ori: torch.Tensor) -> torch.Tensor:
    """sum over flagged neurons i of cos(w_i, w_i^ori) (a sum, as Eq. 3 and the public code)."""
    if not neurons:
        return weight.new_zeros(())
    return F.cosine_similarity(weight[neurons].float(), w_ori.float(), dim=1).sum()


def inner_penalty(weight: torch.Tensor, neurons: list[int], w_ori: torch.Tensor) -> torch.Tensor:
    """sum over flagged neurons i of w_i . w_i^ori: magnitude and direction (Appendix D)."""
    if not neurons:
        return weight.new_zeros(())
    return (weight[neurons].float() * w_ori.float()).sum()


PENALTIES = {"cosine": cosine_penalty, "inner": inner_penalty,
             "none": lambda weight, neurons, w_ori: weight.new_zeros(())}  # Table V's "without Reg"


def relearn(model, linear, batches, neurons: list[int], w_ori: torch.Tensor, cfg,
            log_epoch: Callable | None = None, transform: Callable | None = None) -> dict:
    """Train all parameters on `batches` with CE + alpha * penalty (cfg holds the relearn_*
    options, regularizer, alpha and amp). The cosine to the original rows is logged whatever the
    penalty, as the measure of how far they moved away; `log_epoch(phase, epoch, stats,
    optimizer, model)` receives every epoch's row; `transform(x, y)` rewrites each batch (robust
    mode adds trigger-synthesized copies)."""
    penalty = PENALTIES[cfg.regularizer]
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.relearn_lr,
                                momentum=cfg.relearn_momentum)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.relearn_epochs)

    def loss_fn(logits, labels):
        return cross_entropy(logits, labels) + cfg.alpha * penalty(linear.weight, neurons, w_ori)

    def on_epoch(epoch, stats, steps):
        stats["cosine"] = cosine_penalty(linear.weight.detach(), neurons, w_ori).item()
        if log_epoch is not None:
            log_epoch("relearning", epoch, stats, optimizer, model)

    fit(model, batches, optimizer, cfg.relearn_epochs, loss_fn=loss_fn, scheduler=scheduler,
        amp=cfg.amp, transform=transform, on_epoch=on_epoch, desc="relearning")
    return {"epochs": cfg.relearn_epochs, "regularizer": cfg.regularizer,
            "final_cosine": cosine_penalty(linear.weight.detach(), neurons, w_ori).item()}


def reinitialize_and_relearn(model, linear, batches, neurons: list[int], cfg,
                             log_epoch: Callable | None = None,
                             transform: Callable | None = None) -> dict:
    """Algorithm 3 from the model's current weights: reinitialize the flagged rows (seeded by
    cfg.seed), then relearn them away from the rows they had."""
    w_ori = linear.weight.detach()[neurons].clone()
    reinitialize(linear, neurons, torch.Generator().manual_seed(cfg.seed))
    return relearn(model, linear, batches, neurons, w_ori, cfg, log_epoch, transform)


def predictions_per_class(run: DefenseSession) -> torch.Tensor:
    """How many defense images the session's model predicts as each class."""
    cfg = run.cfg
    return torch.bincount(predict(run.model, run.defense_data, run.preprocess,
                                  eval_batch_size(cfg.eval_batch_size, run.device), cfg.amp),
                          minlength=run.linear.out_features)


# ---------------------------------------------------------------- Algorithm 1
def choose_neurons(found: dict, num_neurons: int, cfg) -> tuple[list[int], str]:
    """The neurons to reinitialize and what to do with them: 'reinitialize', or with none flagged
    no_flag_action's 'finetune' (relearn without reinitializing), 'top' (the ht largest scores)
    or 'stop' (keep the original model). --selection random replaces the flagged ones (Table VI)."""
    neurons, action = found["flagged"], "reinitialize"
    if cfg.selection == "random":  # Table VI: a random choice instead of unlearning's
        neurons = random_neurons(num_neurons, cfg.random_k, cfg.seed)
        log.info("selection random: reinitializing neurons %s", neurons)
    elif not neurons:
        action = cfg.no_flag_action
        log.warning("no neuron was flagged (tau %.2f): no_flag_action=%s", cfg.tau, action)
        if action == "top":
            neurons = found["ranking"][:max(cfg.ht, 1)]
    if len(neurons) == num_neurons:
        log.warning("every classifier neuron is flagged (%d): the whole classifier is "
                    "relearned from scratch; lower --ht or raise --tau", len(neurons))
    return neurons, action


def defend(run: DefenseSession) -> dict:
    """Algorithm 1 on the record's model: unlearn, score, revert, reinitialize, relearn."""
    cfg, model, linear = run.cfg, run.model, run.linear
    if cfg.mode == "robust":
        return robust_defend(run)
    require(cfg.selection != "random" or cfg.random_k <= linear.out_features,
            f"--random_k {cfg.random_k} exceeds the {linear.out_features} classifier neurons")
    batches = run.batches()
    # Algorithm 2, lines 1-8: capture w_pre, unlearn, capture w_post.
    w_pre = linear.weight.detach().clone()
    unlearning = run.timed("unlearning", unlearn, model, batches, cfg, run.log_epoch)
    w_post = linear.weight.detach().clone()
    # For diagnosis: where the unlearned model sends the clean defense images (a "sink" class
    # that collects them moves most, whether or not it is the backdoor's target).
    sink = predictions_per_class(run).tolist()
    # Lines 9-17: score the neurons and flag the outliers.
    found = run.timed("scoring", score_neurons, w_pre, w_post, cfg.tau, cfg.ht, cfg.dispersion,
                      cfg.flag_rule)
    log.info("neuron scores: center %.4g, %s %.4g, threshold %.4g; flagged %s (outliers %s)",
             found["center"], found["scale"], found["scale_value"], found["threshold"],
             found["flagged"], found["outliers"])
    if found["tie_at_cap"]:
        log.warning("scores tie at the cap ht=%d: kept the lower neuron index", cfg.ht)
    neurons, action = choose_neurons(found, linear.out_features, cfg)
    # Line 18: revert to the original (backdoored) weights, BatchNorm buffers included.
    model.load_state_dict(run.original_state())
    relearning = {"epochs": 0}
    if action != "stop":
        # Algorithm 3: reinitialize the flagged neurons, then relearn.
        relearning = run.timed("relearning", reinitialize_and_relearn, model, linear, batches,
                               neurons, cfg, run.log_epoch)
    return {"flagged_neurons": [{"neuron": j, "score": found["scores"][j]} for j in neurons],
            "identification": found, "selection": cfg.selection,
            "no_flag_action": action if action != "reinitialize" else None,
            "unlearning": {**unlearning, "predictions_per_class": sink},
            "relearning": relearning}


# ---------------------------------------------------------------- robust mode (not in the paper)
# Why: unlearning drives the defense images into one "sink" class, and the sink's classifier row
# moves most. On most records the sink is the backdoor's target, but a confusable clean class can
# take its place (the small CNN's Blind and TrojanNN: class 6 takes all 600 images, the target
# ranks 5th by weight change), and masking that sink makes the target the next one
# (results/fashion_mnist_smallcnn/sinks.md). And a fixed alpha is too weak on some models
# (results/fashion_mnist_preactresnet18_w16/). Robust mode reads only the defense subset.
def find_sinks(run: DefenseSession, rounds: int, inputs: torch.Tensor):
    """Unlearn `rounds` times from the original weights on the defense subset, each time masking
    the earlier rounds' sinks; a round's sink is the class that takes most of the unlearned
    model's predictions on the subset (ties: the lower index). Round 0 is faithful ULRL's
    unlearning. Returns per round the sink, its share, the rows' weight-change scores under
    --flag_rule and each rule's flagged rows and upper cut (score_neurons); and, with synthesis
    on (else empty), how each round moved the mean classifier input of `inputs` (the defense
    images, preprocessed): the directions the trigger synthesis follows."""
    cfg, model, linear, data = run.cfg, run.model, run.linear, run.defense_data
    batch = eval_batch_size(cfg.eval_batch_size, run.device)
    found: list[dict] = []
    shifts: list[torch.Tensor] = []
    model.load_state_dict(run.original_state())
    synthesis = cfg.synth_rms > 0
    original_features = mean_features(model, linear, inputs, batch) if synthesis else None
    for r in range(rounds):
        model.load_state_dict(run.original_state())
        masked = [row["sink"] for row in found]
        handle = masked_classes(linear, masked)
        w_pre = linear.weight.detach().clone()
        log_epoch = lambda phase, *rest: run.log_epoch(f"{phase}_round{r}", *rest)  # noqa: E731
        unlearned = unlearn(model, run.batches(), cfg, log_epoch)
        counts = predictions_per_class(run)
        handle.remove()
        if synthesis:
            shifts.append(mean_features(model, linear, inputs, batch) - original_features)
        sink = int(counts.argmax())
        by_rule = {rule: score_neurons(w_pre, linear.weight.detach(), cfg.tau, cfg.ht,
                                       cfg.dispersion, rule) for rule in FLAG_RULES}
        found.append({"round": r, "masked": masked, "sink": sink, "unlearning": unlearned,
                      "sink_share": counts[sink].item() / len(data),
                      "predictions_per_class": counts.tolist(),
                      "identification": by_rule[cfg.flag_rule],
                      "flagged_by_rule": {rule: by_rule[rule]["flagged"] for rule in FLAG_RULES},
                      "threshold_by_rule": {rule: by_rule[rule]["threshold"]
                                            for rule in FLAG_RULES}})
        log.info("sink round %d (masked %s): sink %d takes %d of %d predictions", r, masked, sink,
                 counts[sink].item(), len(data))
    return found, shifts


def with_alpha(cfg, alpha: float) -> SimpleNamespace:
    return SimpleNamespace(**{**vars(cfg), "alpha": alpha})


def choose_alpha(run: DefenseSession, neurons: list[int]) -> dict:
    """Cross-validated relearning strength: for each alpha of the grid, smallest first, Algorithm
    3 is run on all folds but one and scored on the one left out. The penalty is what pushes the
    flagged rows off the backdoor (ASR falls as alpha grows, clean accuracy too), so the walk goes
    up the grid while the cross-validated accuracy stays within heldout_tolerance of the best so
    far, and keeps the last alpha within it. A grid of one alpha is not cross-validated: there is
    nothing to choose."""
    cfg = run.cfg
    if len(set(cfg.alpha_grid)) == 1:
        return {"tried": [], "folds": 0, "alpha": cfg.alpha_grid[0]}

    def accuracy_of(alpha):
        return cross_validated_accuracy(run, cfg.folds, lambda batches: reinitialize_and_relearn(
            run.model, run.linear, batches, neurons, with_alpha(cfg, alpha)))
    choice = walk_up(cfg.alpha_grid, accuracy_of, cfg.heldout_tolerance, "alpha")
    return {"tried": choice["tried"], "folds": cfg.folds, "alpha": choice["alpha"]}


def robust_defend(run: DefenseSession) -> dict:
    """Robust ULRL: the neurons faithful ULRL flags under either rule plus every sink-round's
    sink (a superset, so identification never misses what a faithful rule finds: on the small
    CNN's LC record the target is an outlier of the first round but never a sink, and a
    clean-label target, SIG on PreAct-ResNet, is never a sink but the paper rule's outlier),
    cross-validation on the defense subset chooses alpha, then Algorithm 3 on the whole subset
    with that alpha. With synth_rms > 0, a trigger is synthesized along each sink round's feature
    shift (utils/defenses/synthesis.py); if any still works after that relearning
    (surviving_triggers), relearning is redone with each batch plus one copy under each surviving
    trigger, labelled with the true classes: a flagged row that is reversed does not stop a
    trigger whose features still read as the target's."""
    cfg, model, linear = run.cfg, run.model, run.linear
    require(len(run.defense_data) >= 2 * cfg.folds,
            f"robust mode cross-validates over {cfg.folds} folds: the {len(run.defense_data)} "
            "defense images are too few (raise --ratio or --defense_samples, or lower --folds)")
    require(len(cfg.alpha_grid) > 0, "robust mode needs at least one alpha in --alpha_grid")
    require(cfg.sink_rounds < linear.out_features,
            f"--sink_rounds {cfg.sink_rounds} would mask all {linear.out_features} classes: "
            f"use at most {linear.out_features - 1}")
    inputs = run.preprocess(run.defense_data.images)
    rounds, shifts = run.timed("unlearning", find_sinks, run, cfg.sink_rounds, inputs)
    first = rounds[0]["identification"]  # the unmasked round: faithful ULRL's scores
    outliers = sorted(set().union(*rounds[0]["flagged_by_rule"].values()))
    sinks = [row["sink"] for row in rounds]
    neurons = sorted(set(sinks) | set(outliers))
    log.info("robust mode: flagged %s (sinks %s, outliers of the first round %s)", neurons, sinks,
             outliers)
    model.load_state_dict(run.original_state())
    deltas, synthesis = synthesized_triggers(run, inputs, rounds, shifts)
    choice = run.timed("alpha_choice", choose_alpha, run, neurons)
    log.info("robust mode: alpha %g (%s)", choice["alpha"],
             f"{cfg.folds}-fold cross-validation" if choice["folds"] else "the only one given")
    relearn_cfg = with_alpha(cfg, choice["alpha"])
    model.load_state_dict(run.original_state())
    relearning = run.timed("relearning", reinitialize_and_relearn, model, linear, run.batches(),
                           neurons, relearn_cfg, run.log_epoch)
    surviving = surviving_triggers(run, inputs, deltas, synthesis)
    if surviving:
        # Relearn again from the original weights, each batch with its synthesized-trigger copies
        # (alpha was chosen without them, so the choice costs what it costs without synthesis).
        model.load_state_dict(run.original_state())
        log_epoch = lambda phase, *rest: run.log_epoch(f"{phase}_synthesized", *rest)  # noqa: E731
        relearning = run.timed("relearning", reinitialize_and_relearn, model, linear,
                               run.batches(), neurons, relearn_cfg, log_epoch,
                               with_perturbed_copies(*surviving))
        for delta, trigger in zip(deltas, synthesis["triggers"]):
            trigger["after"] = flip_rate(model, inputs, delta,
                                         eval_batch_size(cfg.eval_batch_size, run.device))
            log.info("round %d's trigger after relearning against the surviving ones: changes "
                     "%.1f %% of the defense predictions", trigger["round"],
                     100 * trigger["after"]["changed"])
    return {"flagged_neurons": [{"neuron": j, "score": first["scores"][j]} for j in neurons],
            "mode": "robust", "identification": {
                **first, "flagged": neurons, "sinks": sinks, "outliers_flagged": outliers,
                "threshold_by_rule": rounds[0]["threshold_by_rule"]},
            "sink_rounds": rounds, "alpha_choice": choice, "synthesis": synthesis,
            "unlearning": {**rounds[0]["unlearning"],
                           "predictions_per_class": rounds[0]["predictions_per_class"]},
            "relearning": relearning}


purify = python_api(OPTIONS, defend, "ulrl")  # the Python API


def main(argv=None):
    cfg = parse_config(OPTIONS, "ULRL backdoor removal on a BackdoorBench attack record", argv)
    return run_defense(cfg, "ulrl", defend)


if __name__ == "__main__":
    main_guard(main)
