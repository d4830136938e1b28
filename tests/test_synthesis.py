"""Trigger synthesis for robust ULRL (utils/defenses/synthesis.py)."""
import math
from types import SimpleNamespace

import torch

from utils.defenses.synthesis import (classifier_inputs, flip_rate, mean_features,
                                      synthesize_trigger, with_perturbed_copies)


def feature_model():
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU())
    return torch.nn.Sequential(body, torch.nn.Linear(8, 3))


CFG = SimpleNamespace(synth_rms=0.1, synth_steps=30, synth_lr=0.05, seed=0, batch_size=16)


def test_classifier_inputs_are_what_the_classifier_reads():
    model = feature_model()
    x = torch.randn(5, 1, 4, 4)
    features, logits = classifier_inputs(model, model[1], x)
    assert torch.allclose(model[1](features), logits)
    assert torch.allclose(mean_features(model, model[1], x, batch_size=2), features.mean(0))


def test_synthesized_trigger_stays_in_budget_and_moves_features_along_the_direction():
    model, x = feature_model(), torch.randn(40, 1, 4, 4)
    std = torch.full((1, 1, 1, 1), 0.5)
    direction = torch.zeros(8)
    direction[3] = 1.0
    delta = synthesize_trigger(model, model[1], x, direction, std, CFG)
    assert delta.shape == (1, 1, 4, 4)
    pixels = delta * std  # the budget is in pixel units
    assert pixels.norm() <= CFG.synth_rms * math.sqrt(16) + 1e-5
    before = classifier_inputs(model, model[1], x)[0][:, 3].mean()
    after = classifier_inputs(model, model[1], x + delta)[0][:, 3].mean()
    assert after > before
    again = synthesize_trigger(model, model[1], x, direction, std, CFG)
    assert torch.equal(delta, again)  # seeded mini-batches
    assert all(p.grad is None for p in model.parameters())  # only the perturbation is optimized


def test_no_feature_shift_synthesizes_nothing():
    model, x = feature_model(), torch.randn(20, 1, 4, 4)
    delta = synthesize_trigger(model, model[1], x, torch.zeros(8), torch.ones(1, 1, 1, 1), CFG)
    assert torch.count_nonzero(delta) == 0


def test_perturbed_copies_add_one_copy_per_trigger_with_true_labels():
    x, y = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 1])
    delta, other = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), -0.25)
    xs, ys = with_perturbed_copies(delta)(x, y)
    assert torch.equal(xs[:4], x) and torch.equal(xs[4:], x + delta)
    assert torch.equal(ys, torch.cat([y, y]))
    xs, ys = with_perturbed_copies(delta, other)(x, y)
    assert torch.equal(xs, torch.cat([x, x + delta, x + other])) and torch.equal(ys, y.repeat(3))


def test_flip_rate_counts_changed_predictions_and_their_class():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
    x = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]], [[[2.0, 0.0]]], [[[0.0, 3.0]]]])
    delta = torch.tensor([[[[0.0, 1.5]]]])  # moves the first image to class 1, not the third
    assert flip_rate(model, x, delta, batch_size=3) == {
        "changed": 0.25, "top_class": 1, "top_share": 0.75, "class_shares": [0.25, 0.75]}

