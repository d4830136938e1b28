"""ULRL's own pieces: neuron scoring, reinitialization, the cosine penalty."""
import math

import pytest
import torch

from defense.ulrl import cosine_penalty, reinitialize, score_neurons


def moved(changes, fan_in=4):
    """w_pre = 0 and w_post rows whose L1 norms are `changes` (score_j = changes[j])."""
    w_pre = torch.zeros(len(changes), fan_in)
    w_post = torch.tensor(changes, dtype=torch.float).unsqueeze(1).repeat(1, fan_in) / fan_in
    return w_pre, w_post


def test_score_is_l1_row_change():
    w_pre = torch.randn(5, 7)
    w_post = w_pre + torch.randn(5, 7)
    found = score_neurons(w_pre, w_post, tau=3.5, ht=2)
    expected = (w_post - w_pre).abs().sum(1)
    assert found["scores"] == pytest.approx(expected.tolist(), rel=1e-5)


def test_single_outlier_flagged_with_median_mad_threshold():
    found = score_neurons(*moved([1.0, 1.1, 0.9, 1.2, 0.8, 1.05, 0.95, 1.0, 10.0, 1.0]), 3.5, 2)
    assert found["flagged"] == [8]
    assert found["median"] == pytest.approx(1.0)
    assert found["mad"] == pytest.approx(0.05, abs=1e-6)
    assert found["threshold"] == pytest.approx(1.0 + 3.5 * 1.4826 * 0.05, rel=1e-4)


def test_ht_keeps_the_largest_not_the_lowest_indices():
    changes = [1.0, 1.1, 0.9, 1.0, 1.0, 1.05, 0.95, 1.0, 1.0, 1.0]
    changes[1], changes[4], changes[7] = 5.0, 20.0, 9.0  # three outliers, index 1 the smallest
    found = score_neurons(*moved(changes), tau=3.5, ht=2)
    assert found["outliers"] == [4, 7, 1]
    assert found["flagged"] == [4, 7]  # the public code would keep [1, 4]


def test_ht_zero_means_no_cap():
    changes = [1.0, 1.02, 0.98, 1.0, 30.0, 1.0, 20.0, 1.01, 10.0, 0.99]
    assert score_neurons(*moved(changes), tau=3.5, ht=0)["flagged"] == [4, 6, 8]


def test_ties_at_the_cap_keep_lower_index_and_are_reported():
    changes = [1.0, 1.02, 0.98, 1.0, 9.0, 1.0, 9.0, 1.01, 9.0, 0.99]
    found = score_neurons(*moved(changes), tau=3.5, ht=2)
    assert found["flagged"] == [4, 6]
    assert found["tie_at_cap"] is True


def test_even_count_uses_lower_middle_median():
    found = score_neurons(*moved([1.0, 2.0, 3.0, 4.0]), tau=3.5, ht=2)
    assert found["median"] == pytest.approx(2.0)  # torch.median: lower of the two middle values


def test_lower_tail_is_never_flagged():
    changes = [1.0, 1.02, 0.98, 1.0, 1.01, 1.0, 0.99, 1.0, 1.0, 0.0]
    assert score_neurons(*moved(changes), tau=3.5, ht=2)["flagged"] == []


def test_mad_zero_falls_back_to_mean_absolute_deviation():
    changes = [1.0] * 8 + [5.0, 1.5]  # MAD = 0: over half the scores are exactly the median
    found = score_neurons(*moved(changes), tau=3.5, ht=2)
    assert found["mad"] == 0
    assert found["scale"] == "mean_absolute_deviation"
    mean_ad = (4.0 + 0.5) / 10
    assert found["scale_value"] == pytest.approx(1.2533 * mean_ad, rel=1e-4)
    assert found["flagged"] == [8]  # z = 4 / 0.564 = 7.1 > 3.5; neuron 9: z = 0.89


def test_all_equal_scores_flag_nothing():
    found = score_neurons(*moved([2.0] * 10), tau=3.5, ht=2)
    assert found["flagged"] == [] and found["outliers"] == []
    assert found["scale"].startswith("none")


def test_reinitialize_rows_bounds_bias_and_others_untouched():
    linear = torch.nn.Linear(512, 10)
    before = linear.weight.detach().clone(), linear.bias.detach().clone()
    reinitialize(linear, [0, 6], torch.Generator().manual_seed(0))
    bound = math.sqrt(2 / 512)
    w, b = linear.weight.detach(), linear.bias.detach()
    assert w[[0, 6]].abs().max() <= bound
    assert w[[0, 6]].std() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # U(-a, a) has sd a/sqrt(3)
    assert not torch.equal(w[0], before[0][0])
    assert torch.all(b[[0, 6]] == 0)
    keep = [1, 2, 3, 4, 5, 7, 8, 9]
    assert torch.equal(w[keep], before[0][keep]) and torch.equal(b[keep], before[1][keep])


def test_reinitialize_is_seeded():
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    reinitialize(a, [1], torch.Generator().manual_seed(3))
    reinitialize(b, [1], torch.Generator().manual_seed(3))
    assert torch.equal(a.weight[1], b.weight[1])


def test_cosine_penalty_value_and_gradient():
    torch.manual_seed(0)
    weight = torch.randn(10, 6, requires_grad=True)
    w_ori = torch.randn(2, 6)
    neurons = [3, 7]
    penalty = cosine_penalty(weight, neurons, w_ori)
    manual = sum(torch.dot(weight[i], w_ori[k]) / (weight[i].norm() * w_ori[k].norm())
                 for k, i in enumerate(neurons))
    assert penalty.item() == pytest.approx(manual.item(), rel=1e-5)
    penalty.backward()
    grad = weight.grad
    assert torch.all(grad[[0, 1, 2, 4, 5, 6, 8, 9]] == 0)  # only flagged rows get a gradient
    for k, i in enumerate(neurons):  # d cos / d w = (u_ori - cos * u) / |w|, u = unit vectors
        w, o = weight.detach()[i], w_ori[k]
        cos = torch.dot(w, o) / (w.norm() * o.norm())
        expected = (o / o.norm() - cos * w / w.norm()) / w.norm()
        assert torch.allclose(grad[i], expected, atol=1e-5)
        # a small step against the gradient lowers the similarity (pushes w_i away from w_i^ori)
        assert torch.dot(grad[i], expected) > 0


def test_cosine_penalty_empty_set_is_zero():
    assert cosine_penalty(torch.randn(4, 3), [], torch.empty(0, 3)).item() == 0
