"""ULRL's ablation switches: each changes behaviour as specified (dispersion, regularizer, random
selection, stop rule), and one run through main() with all of them and a tag."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from defense.ulrl import PENALTIES, main, random_neurons, relearn, score_neurons
from tests.helpers import tiny_record
from utils.core.errors import UserError
from utils.data.images import ImageSet, Preprocess
from utils.defenses.unlearning import unlearn
from utils.training.train import Batches

# One extreme outlier (9) and a moderate one (8): MAD flags both; IQR, wider here, misses the
# moderate one and SD, inflated by the extreme one, misses both (Appendix C's observations).
CRAFTED = [0.9, 1.0, 1.0, 1.0, 1.1, 1.2, 1.4, 1.6, 2.2, 9.0]


def moved(changes, fan_in=4):
    """w_pre = 0 and w_post rows whose L1 norms are `changes` (score_j = changes[j])."""
    w_pre = torch.zeros(len(changes), fan_in)
    return w_pre, torch.tensor(changes).unsqueeze(1).repeat(1, fan_in) / fan_in


def test_mad_sd_and_iqr_flag_differently_on_a_crafted_vector():
    flagged = {d: score_neurons(*moved(CRAFTED), tau=3.5, ht=0, dispersion=d)["flagged"]
               for d in ("mad", "sd", "iqr")}
    assert flagged == {"mad": [9, 8], "sd": [], "iqr": [9]}


# Median 1.0 (torch's lower middle of ten), MAD 0.05. Neuron 9 sits 1.0 above, 8 sits 0.9 below,
# 7 sits 0.2 above: between the paper's cut (3.5 x 0.05 = 0.175) and the code's (3.5 x 1.4826 x
# 0.05 = 0.259).
TWO_SIDED = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.2, 0.1, 2.0]


def test_the_paper_rule_is_raw_mad_and_two_sided_the_code_rule_scaled_and_upper():
    paper = score_neurons(*moved(TWO_SIDED), tau=3.5, ht=0, rule="paper")
    code = score_neurons(*moved(TWO_SIDED), tau=3.5, ht=0, rule="code")
    assert paper["flagged"] == [9, 8, 7] and code["flagged"] == [9]
    assert paper["scale_value"] == pytest.approx(0.05, rel=1e-5)
    assert code["scale_value"] == pytest.approx(1.4826 * 0.05, rel=1e-5)
    assert paper["threshold"] == pytest.approx(1.175, rel=1e-5)
    assert paper["lower_threshold"] == pytest.approx(0.825, rel=1e-5)
    assert code["threshold"] == pytest.approx(1.0 + 3.5 * 1.4826 * 0.05, rel=1e-5)
    # the cap keeps the largest deviations: 9 (+1.0) and 8 (-0.9) for the paper
    assert score_neurons(*moved(TWO_SIDED), tau=3.5, ht=2, rule="paper")["flagged"] == [9, 8]
    assert score_neurons(*moved(CRAFTED), tau=3.5, ht=0, rule="paper")["flagged"] == [9, 8, 7]


def test_each_dispersion_uses_its_center_and_sigma_scaled_spread():
    scores = torch.tensor(CRAFTED)
    sd = score_neurons(*moved(CRAFTED), tau=2.0, ht=0, dispersion="sd")
    assert sd["center"] == pytest.approx(scores.mean().item(), rel=1e-5)
    assert sd["scale_value"] == pytest.approx(scores.std(correction=0).item(), rel=1e-5)
    assert sd["flagged"] == [9]  # z = 2.96: SD flags the extreme one only, and only at a low tau
    iqr = score_neurons(*moved(CRAFTED), tau=3.5, ht=0, dispersion="iqr")
    q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75]))
    assert iqr["center"] == pytest.approx(1.1, rel=1e-5)  # torch's lower median of 10 values
    assert iqr["threshold"] == pytest.approx(1.1 + 3.5 * (q3 - q1).item() / 1.349, rel=1e-5)
    mad = score_neurons(*moved(CRAFTED), tau=3.5, ht=0)  # the default is the published MAD rule
    assert mad["dispersion"] == "mad" and mad["scale"] == "MAD"


def test_regularizer_none_is_a_zero_penalty_and_inner_is_the_dot_product():
    weight = torch.randn(6, 5, requires_grad=True)
    w_ori = torch.randn(2, 5)
    none = PENALTIES["none"](weight, [1, 4], w_ori)
    assert none.item() == 0 and not none.requires_grad  # nothing pulls on the weights
    inner = PENALTIES["inner"](weight, [1, 4], w_ori)
    assert inner.item() == pytest.approx((weight[1] @ w_ori[0] + weight[4] @ w_ori[1]).item(),
                                         rel=1e-5)
    assert PENALTIES["inner"](weight, [], torch.empty(0, 5)).item() == 0


def synthetic_run(**cfg):
    """A stub DefenseRun: a linear model on 64 random 1x8x8 images in 4 classes."""
    torch.manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8),
                    torch.randint(0, 4, (64,)))
    batches = Batches(data, Preprocess((0.5,), (0.5,), 1, crop_padding=0), 16, shuffle=True,
                      augment=False, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    defaults = dict(unlearning_lr=0.01, unlearning_momentum=0.9, unlearning_weight_decay=5e-4,
                    unlearning_milestones=[10, 20], unlearning_gamma=0.1, unlearning_epochs=3,
                    clip_norm=20.0, amp=False,
                    clean_threshold=0.2, stop_rule="epoch", relearn_lr=0.05, relearn_epochs=2,
                    relearn_momentum=0.9, alpha=0.7, regularizer="cosine")
    run = SimpleNamespace(cfg=SimpleNamespace(**{**defaults, **cfg}), rows=[])
    run.log_epoch = lambda phase, epoch, stats, optimizer, model: run.rows.append(stats)
    return run, model, batches


def test_step_rule_stops_before_the_step_that_meets_ca_min():
    # CA_min = 1: every accuracy meets it. The step rule stops before the first update; the
    # epoch rule only looks after a whole epoch of updates.
    run, model, batches = synthetic_run(stop_rule="step", clean_threshold=1.0)
    before = model[1].weight.detach().clone()
    result = unlearn(model, batches, run.cfg, run.log_epoch)
    assert result["steps"] == 0 and result["epochs"] == 1 and result["reached_threshold"]
    assert torch.equal(model[1].weight, before)
    run, model, batches = synthetic_run(stop_rule="epoch", clean_threshold=1.0)
    result = unlearn(model, batches, run.cfg, run.log_epoch)
    assert result["steps"] == len(batches) and result["epochs"] == 1
    assert not torch.equal(model[1].weight, before)


def test_both_rules_run_every_step_when_ca_min_is_never_met():
    for rule in ("epoch", "step"):
        run, model, batches = synthetic_run(stop_rule=rule, clean_threshold=-1.0)
        result = unlearn(model, batches, run.cfg, run.log_epoch)
        assert result["steps"] == 3 * len(batches) and not result["reached_threshold"]


def test_regularizer_none_relearns_exactly_like_alpha_zero():
    finals = {}
    for name, cfg in {"none": dict(regularizer="none"), "alpha0": dict(alpha=0.0),
                      "cosine": dict()}.items():
        run, model, batches = synthetic_run(**cfg)
        w_ori = model[1].weight.detach()[[0, 2]].clone()
        relearn(model, model[1], batches, [0, 2], w_ori, run.cfg, run.log_epoch)
        finals[name] = model[1].weight.detach()
    assert torch.equal(finals["none"], finals["alpha0"])
    assert not torch.equal(finals["none"], finals["cosine"])


def test_random_selection_draws_k_distinct_neurons_with_the_seed():
    for k in (1, 2, 5, 10):
        picked = random_neurons(10, k, seed=0)
        assert len(picked) == k == len(set(picked)) and all(0 <= j < 10 for j in picked)
    assert random_neurons(10, 3, seed=1) == random_neurons(10, 3, seed=1)
    assert len({tuple(random_neurons(100, 3, seed=s)) for s in range(5)}) == 5


def test_switches_through_main_with_a_tag(tmp_path):
    tiny_record(tmp_path / "r")
    main(["--result_file", "r", "--record_dir", str(tmp_path), "--ratio", "0.002",
          "--unlearning_epochs", "2", "--relearn_epochs", "1", "--tag", "abl", "--plots", "false",
          "--selection", "random", "--random_k", "3", "--stop_rule", "step",
          "--dispersion", "iqr", "--regularizer", "inner"])
    out = tmp_path / "r/defense/ulrl_abl"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "ulrl_abl" and (out / "ulrl_abl_df.csv").is_file()
    assert [f["neuron"] for f in summary["flagged_neurons"]] == random_neurons(10, 3, 0)
    assert summary["selection"] == "random" and summary["identification"]["dispersion"] == "iqr"
    assert summary["unlearning"]["stop_rule"] == "step"
    assert summary["relearning"]["regularizer"] == "inner"
    assert not (tmp_path / "r/defense/ulrl").exists()  # the untagged results are left alone


def test_any_defense_takes_a_tag_and_draws_its_plots(tmp_path):
    """--tag and --plots are common options: a tagged FT run with per-epoch curves writes
    defense/ft_lr1/ with its curve chart and leaves defense/ft/ alone."""
    import defense.ft as ft
    tiny_record(tmp_path / "r")
    ft.main(["--result_file", "r", "--record_dir", str(tmp_path), "--ratio", "0.002",
             "--epochs", "2", "--tag", "lr1", "--curve_samples", "20"])
    out = tmp_path / "r/defense/ft_lr1"
    assert json.loads((out / "summary.json").read_text())["method"] == "ft_lr1"
    assert (out / "ft_lr1_df.csv").is_file() and (out / "curves.png").stat().st_size > 1000
    assert not (tmp_path / "r/defense/ft").exists()
    with pytest.raises(UserError, match="--tag must be letters"):
        ft.main(["--result_file", "r", "--record_dir", str(tmp_path), "--tag", "../x"])
