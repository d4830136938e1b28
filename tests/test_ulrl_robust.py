"""ULRL's robust mode: held-out split, masked sinks, the alpha rule, and a run that reads nothing
but the defense subset."""
import json

import pytest
import torch

from defense import ulrl
from tests.helpers import tiny_record


def test_holdout_split_is_stratified_disjoint_and_seeded():
    labels = torch.tensor([0] * 40 + [1] * 20 + [2] * 3 + [3])
    fit, held = ulrl.holdout_split(labels, 0.25, seed=0)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[held], minlength=4).tolist() == [10, 5, 1, 0]  # a lone image fits
    again_fit, again_held = ulrl.holdout_split(labels, 0.25, seed=0)
    assert torch.equal(held, again_held) and torch.equal(fit, again_fit)
    assert not torch.equal(ulrl.holdout_split(labels, 0.25, seed=1)[1], held)


def test_masked_classes_pins_logits_until_removed():
    linear = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3)
    handle = ulrl.masked_classes(linear, [1, 3])
    out = linear(x)
    assert (out[:, [1, 3]] == -1e4).all() and torch.equal(out.argmax(1) % 2, torch.zeros(5).long())
    out.sum().backward()  # no gradient reaches the masked rows
    assert linear.weight.grad[[1, 3]].abs().sum() == 0 and linear.weight.grad[[0, 2]].abs().sum() > 0
    handle.remove()
    assert torch.equal(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias))


@pytest.mark.parametrize("accs, expected, within", [
    ([0.80, 0.79, 0.77, 0.79], 3.0, True),   # the largest within 2 points of 0.80, skipping one
    ([0.80, 0.81, 0.79, 0.78], 3.0, True),   # 0.78 is exactly 2 points below: still within
    ([0.70, 0.74, 0.74, 0.60], 0.3, False),  # none within: the best, the smaller alpha on a tie
])
def test_pick_alpha_keeps_the_strongest_within_tolerance(accs, expected, within):
    tried = [{"alpha": a, "heldout_acc": acc} for a, acc in zip([0.1, 0.3, 1.0, 3.0], accs)]
    assert ulrl.pick_alpha(tried, 0.80, 0.02 + 1e-9) == {"alpha": expected,
                                                          "within_tolerance": within}


SHORT = ["--unlearning_epochs", "2", "--relearn_epochs", "1", "--alpha_grid", "0.1", "1"]


def test_robust_run_flags_the_sinks_and_reports_its_choices(tmp_path):
    tiny_record(tmp_path / "r")
    ulrl.main(["--result_file", "r", "--record_dir", str(tmp_path), "--ratio", "0.01",
               "--mode", "robust", *SHORT])
    summary = json.loads((tmp_path / "r/defense/ulrl/summary.json").read_text())
    rounds = summary["sink_rounds"]
    assert [r["masked"] for r in rounds] == [[], [rounds[0]["sink"]]]
    assert rounds[1]["sink"] != rounds[0]["sink"]
    assert rounds[1]["predictions_per_class"][rounds[0]["sink"]] == 0  # masked: never predicted
    assert [f["neuron"] for f in summary["flagged_neurons"]] == sorted(r["sink"] for r in rounds)
    assert summary["fit_samples"] == 450 and summary["heldout_samples"] == 150
    choice = summary["alpha_choice"]
    assert [t["alpha"] for t in choice["tried"]] == [0.1, 1.0]
    assert choice["alpha"] in (0.1, 1.0) and summary["relearning"]["epochs"] == 1
    header, *rows = (tmp_path / "r/defense/ulrl/ulrl_df.csv").read_text().splitlines()
    phases = {row.split(",")[header.split(",").index("phase")] for row in rows}
    assert phases == {"unlearning_round0", "unlearning_round1", "relearning"}
    assert (tmp_path / "r/defense/ulrl/neuron_changes.png").is_file()  # round 0's scores, sinks red


def test_robust_purify_needs_no_test_set_and_is_deterministic():
    """The mode's choices come from the defense subset alone: no test set, backdoor set or target
    is given, and the same seed gives the same choices and weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3))
    images = torch.randint(0, 256, (60, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(60) % 3
    runs = [ulrl.purify(model, images, labels, mode="robust", device="cpu", unlearning_epochs=2,
                        relearn_epochs=1, alpha_grid=[0.1, 1.0], batch_size=16) for _ in range(2)]
    (first, report), (second, again) = runs
    assert report["alpha_choice"] == again["alpha_choice"] and "before" not in report
    assert report["heldout_samples"] == 15 and len(report["flagged_neurons"]) == 2
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
