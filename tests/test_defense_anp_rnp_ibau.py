"""ANP, RNP and I-BAU: the shared BatchNorm-mask pieces on tiny tensors, I-BAU's hypergradient
against finite differences, and each defense end to end on the small BadNets record."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from defense import anp, ibau, rnp
from models import build_model
from utils.core.errors import UserError
from utils.data.record import load_attack_record, load_defense_result
from utils.defenses.bn_mask import MaskedBatchNorm2d, channels_at_or_below, choose_threshold, \
    clamp_masks, mask_batchnorms, prune_channels, set_perturbed
from tests.outcomes import check, seed_args


def conv_bn(channels=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels))
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2)
    return model.eval()


# ---------------------------------------------------------------- shared BatchNorm-mask pieces
def test_masked_batchnorm_computes_gamma_times_mask_and_anp_noise():
    bn = conv_bn()[1]
    masked = MaskedBatchNorm2d(bn).eval()
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(masked(x), bn(x))  # mask 1, no noise: the plain layer
    with torch.no_grad():
        masked.mask.copy_(torch.tensor([1.0, 0.5, 0.0, 0.25]))
        masked.weight_noise.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        masked.bias_noise.copy_(torch.tensor([-0.4, 0.2, 0.0, 0.1]))

    def expected(scale, shift):
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight * scale, bn.bias * shift,
                            False, 0.0, bn.eps)

    assert torch.allclose(masked(x), expected(masked.mask, 1))
    set_perturbed({"bn": masked}, True)
    assert torch.allclose(masked(x), expected(masked.mask + masked.weight_noise,
                                              1 + masked.bias_noise))


def test_mask_batchnorms_replaces_every_batchnorm_and_freezes_the_weights():
    model = build_model("smallcnn", 10, in_channels=1)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    layers = mask_batchnorms(model, "rnp")
    assert list(layers) == names and len(names) == 3
    assert all(isinstance(model.get_submodule(n), MaskedBatchNorm2d) for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[1] in ("mask", "weight_noise", "bias_noise")
                             for n in trainable)
    with torch.no_grad():
        layers[names[0]].mask.fill_(3.0)
    clamp_masks(layers)
    assert layers[names[0]].mask.max() == 1


def test_a_model_without_batchnorm_is_one_clear_error():
    with pytest.raises(UserError, match="no BatchNorm2d layer"):
        mask_batchnorms(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "anp")


@pytest.mark.parametrize("zero_beta", [False, True])
def test_pruned_channels_have_zero_gamma_and_constant_or_zero_output(zero_beta):
    model = conv_bn()
    assert prune_channels(model, {"1": [1, 3]}, zero_beta) == 2
    bn = model[1]
    assert bn.weight[[1, 3]].eq(0).all() and bn.weight[[0, 2]].ne(0).all()
    out = model(torch.randn(3, 1, 6, 6))
    for c in (1, 3):  # gamma = 0: the channel outputs beta everywhere, 0 once beta is zeroed too
        assert torch.allclose(out[:, c], bn.bias[c].expand_as(out[:, c]))
        assert out[:, c].abs().max().item() == 0 if zero_beta else bn.bias[c] != 0
    assert out[:, 0].std() > 0.1


def test_channels_at_or_below_a_threshold():
    masks = {"a": torch.tensor([0.0, 0.4, 0.41, 1.0]), "b": torch.tensor([0.9, 1.0])}
    assert channels_at_or_below(masks, 0.4) == {"a": [0, 1]}
    assert channels_at_or_below(masks, 0.95) == {"a": [0, 1, 2], "b": [0]}


def test_threshold_rule_takes_the_largest_threshold_within_the_accuracy_budget():
    model = conv_bn(channels=8)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {"1": torch.linspace(0.05, 0.75, 8)}  # 0.05, 0.15, ..., 0.75

    def accuracy(m):  # a stand-in for defense-subset accuracy: loses 0.05 per pruned channel
        return 0.9 - 0.05 * (m[1].weight == 0).sum().item()

    found = choose_threshold(model, original, masks, [0.1, 0.3, 0.5, 0.7], accuracy, acc_drop=0.2)
    # floor 0.72: thresholds 0.1 / 0.3 / 0.5 / 0.7 prune 1 / 3 / 5 / 7 channels -> 0.85 / 0.75 /
    # 0.65 / 0.55, so 0.3 is the largest that passes
    assert found["threshold"] == 0.3 and found["within_accuracy_budget"]
    assert found["pruned"] == {"1": [0, 1, 2]} and found["pruned_channels"] == 3
    assert [row["pruned_channels"] for row in found["table"]] == [1, 3, 5, 7]
    assert model[1].weight[:3].eq(0).all() and model[1].weight[3:].ne(0).all()  # left pruned
    none_pass = choose_threshold(model, original, masks, [0.5, 0.7], accuracy, acc_drop=0.01)
    assert none_pass["threshold"] == 0.5 and not none_pass["within_accuracy_budget"]


# ---------------------------------------------------------------- I-BAU's hypergradient
def test_ibau_hypergradient_matches_finite_differences_through_the_fixed_point():
    """With a strongly convex inner problem (large penalty) and many fixed-point terms, the implicit
    hypergradient equals d/dtheta of the outer loss at the inner optimum delta*(theta)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 1, 2, 2, dtype=torch.double), torch.tensor([0, 1, 2, 0, 1, 2])
    cfg = SimpleNamespace(amp=False, perturbation_penalty=1.0, inner_lr=0.2, fixed_point_steps=100)
    carrier = torch.ones(6, 1, 1, 1, dtype=torch.double)

    def inner_optimum():
        delta = torch.zeros(1, 1, 2, 2, dtype=torch.double, requires_grad=True)
        for _ in range(100):
            objective, _ = ibau.inner_loss(model, x, y, delta, cfg.perturbation_penalty, False)
            (g,) = torch.autograd.grad(objective, delta)
            delta = (delta - cfg.inner_lr * g).detach().requires_grad_(True)
        return delta.detach()

    def outer_at_optimum():
        delta = inner_optimum()
        with torch.no_grad():
            return F.cross_entropy(model(x + delta), y).item()

    params = list(model.parameters())
    ibau.hypergradient_step(model, params, inner_optimum(), x, y, carrier, cfg)
    weight = params[0]
    h, (i, j) = 1e-4, (1, 2)
    analytic = weight.grad[i, j].item()
    values = []
    for step in (h, -h):
        with torch.no_grad():
            weight[i, j] += step
        values.append(outer_at_optimum())
        with torch.no_grad():
            weight[i, j] -= step
    up, down = values
    numeric = (up - down) / (2 * h)
    assert analytic == pytest.approx(numeric, rel=1e-3, abs=1e-6)
    model.zero_grad()
    direct = torch.autograd.grad(F.cross_entropy(model(x + inner_optimum()), y), weight)[0]
    assert abs(direct[i, j].item() - numeric) > 1e-3  # the implicit term matters here


# ---------------------------------------------------------------- end to end on BadNets
def run_defense(module, method, record, *args):
    records, name = record
    module.main(["--result_file", name, "--record_dir", str(records), *seed_args(),
                 *map(str, args)])
    out = records / name / "defense" / method
    for f in ("defense_result.pt", "summary.json", f"{method}_df.csv", f"{method}_df_summary.csv",
              f"{method}_before_after.csv", f"{method}.log", "index.txt"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    return summary, load_defense_result(out / "defense_result.pt")["model"]


def original_weights(record):
    records, name = record
    return load_attack_record(records / name).state_dict


def check_pruned(summary, state, original):
    """Only gamma of the chosen channels changed, to zero; the masks are recorded."""
    pruning, masks = summary["pruning"], summary["masks"]
    assert pruning["pruned_channels"] == sum(len(c) for c in pruning["pruned"].values()) > 0
    for layer, values in masks.items():
        assert len(values) == original[f"{layer}.weight"].numel()
        assert all(0 <= v <= 1 for v in values)
        pruned = set(pruning["pruned"].get(layer, []))
        assert pruned == {c for c, v in enumerate(values) if v <= pruning["threshold"]}
        gamma = state[f"{layer}.weight"]
        for c in range(len(values)):
            expected = 0 if c in pruned else original[f"{layer}.weight"][c]
            assert gamma[c] == expected
    changed = [k for k in state if not torch.equal(state[k], original[k].to(state[k].dtype))]
    assert changed and all(k.endswith(".weight") and k.rsplit(".", 1)[0] in masks for k in changed)
    assert_pruned_channels_carry_nothing(state, pruning["pruned"])
    assert_threshold_rule(pruning)


def assert_threshold_rule(pruning):
    """The recorded choice follows the rule on the recorded candidate table: the largest threshold
    within the defense-accuracy floor, else the most accurate candidate."""
    table, floor = pruning["table"], pruning["defense_acc_floor"]
    passing = [row for row in table if row["defense_acc"] >= floor]
    expected = passing[-1] if passing else max(
        table, key=lambda row: (row["defense_acc"], -row["threshold"]))
    assert pruning["threshold"] == expected["threshold"]
    assert pruning["within_accuracy_budget"] == bool(passing)


def assert_pruned_channels_carry_nothing(state, pruned):
    """In the saved model a pruned channel's output is the same for every image and position
    (gamma 0 leaves only beta), so no trigger can pass through it."""
    model = build_model("smallcnn", 10, 1, 28).eval()
    model.load_state_dict(state)
    seen = {}
    for layer, channels in pruned.items():
        module = model.get_submodule(layer)
        module.register_forward_hook(lambda m, i, out, layer=layer: seen.__setitem__(layer, out))
    with torch.no_grad():
        model(torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    for layer, channels in pruned.items():
        out = seen[layer][:, channels].flatten(2)  # (images, channels, positions)
        assert torch.equal(out, out[:1, :, :1].expand_as(out)), layer


@pytest.mark.outcome
def test_anp_prunes_the_channels_its_masks_rank_lowest(small_badnet_record):
    """fashion_mnist.yaml with 60 iterations at batch 64 instead of 300 at 128 (time budget). On
    this small CNN whether ANP's pruning budget reaches the backdoor is a coin flip: over seeds
    0-2 x 1-2 threads the ASR drops by 1.5 to 93 points (the yaml's 300 iterations leave 69-73 %
    on seed 0), so no ASR bound holds; the test holds the mechanism (masks, pruned channels
    constant, the threshold rule) and the C-ACC bound the spread supports: down by less than 10
    points (measured 0.6-7.5)."""
    summary, state = run_defense(anp, "anp", small_badnet_record, "--yaml_path",
                                 "config/defense/anp/fashion_mnist.yaml", "--iterations", 60,
                                 "--batch_size", 64, "--log_every", 30)
    check_pruned(summary, state, original_weights(small_badnet_record))
    check("ASR before", summary["before"]["test_asr"], ">", 0.9)
    check("C-ACC change", summary["after"]["test_acc"] - summary["before"]["test_acc"], ">", -0.1)


@pytest.mark.outcome
def test_rnp_unlearns_recovers_and_prunes(small_badnet_record):
    """fashion_mnist.yaml. RNP's outcome on this small CNN is erratic: over seeds 0-2 x 1-2 threads
    the ASR after is 6-67 % and the C-ACC change -6.8 to -19.3 points (on seed 1 no candidate
    threshold keeps 90 % of the defense accuracy), so the test holds the mechanism (unlearning to
    CA_min, masks, pruned channels constant, the threshold rule) and the bounds that spread
    supports: ASR down by more than 20 points, C-ACC down by less than 25."""
    summary, state = run_defense(rnp, "rnp", small_badnet_record, "--yaml_path",
                                 "config/defense/rnp/fashion_mnist.yaml")
    check_pruned(summary, state, original_weights(small_badnet_record))
    assert summary["unlearning"]["reached_threshold"]
    pruning = summary["pruning"]
    assert pruning["defense_acc_floor"] == pytest.approx(0.9 * pruning["defense_acc_unpruned"])
    check("ASR drop", summary["before"]["test_asr"] - summary["after"]["test_asr"], ">", 0.2)
    check("C-ACC change", summary["after"]["test_acc"] - summary["before"]["test_acc"], ">", -0.25)


@pytest.mark.outcome
def test_ibau_changes_the_weights_and_lowers_the_asr(small_badnet_record):
    # fashion_mnist.yaml with 2 rounds instead of 5 (time budget); over seeds 0-2 x 1-2 threads
    # the ASR falls from 99 % to 9-48 %
    summary, state = run_defense(ibau, "ibau", small_badnet_record, "--yaml_path",
                                 "config/defense/ibau/fashion_mnist.yaml", "--rounds", 2)
    original = original_weights(small_badnet_record)
    assert any(not torch.equal(state[k], original[k]) for k in state if k.endswith("weight"))
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(0 < r["perturbation_norm"] <= 3 + 1e-4 for r in summary["rounds"])  # radius 3
    check("ASR", summary["after"]["test_asr"], "<", 0.8)
