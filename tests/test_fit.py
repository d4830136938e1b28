"""utils.training.train.fit, the one training loop: epochs, scheduler, per-epoch callback, the two
stop rules and gradient ascent, on a toy model and toy batches (no record, no data set)."""
import torch

from utils.training.train import accuracy, fit


class ToyBatches:
    """`count` fixed batches of 8 two-feature points, labelled by the sign of their first
    feature."""

    def __init__(self, count=3):
        generator = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(count):
            x = torch.randn(8, 2, generator=generator)
            self.batches.append((x, (x[:, 0] > 0).long(), torch.arange(8)))

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def toy(lr=0.5):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)


def test_runs_every_epoch_steps_the_scheduler_and_reports_each():
    model, optimizer, scheduler = toy()
    rows = []
    done = fit(model, ToyBatches(), optimizer, 4, scheduler=scheduler,
               on_epoch=lambda epoch, stats, steps: rows.append((epoch, steps, sorted(stats))))
    assert rows == [(e, 3 * (e + 1), ["loss", "train_acc"]) for e in range(4)]
    assert done["epochs"] == 4 and done["steps"] == 12 and done["stopped"] is False
    assert optimizer.param_groups[0]["lr"] == 0.5 * 0.5 ** 4
    assert done["train_acc"] > 0.8  # a separable toy problem is learned


def test_callback_columns_are_kept_in_the_result():
    model, optimizer, _ = toy()
    done = fit(model, ToyBatches(), optimizer, 2,
               on_epoch=lambda epoch, stats, steps: stats.update(extra=epoch))
    assert done["extra"] == 1


def test_epoch_stop_ends_after_that_epoch_without_a_scheduler_step():
    model, optimizer, scheduler = toy()
    done = fit(model, ToyBatches(), optimizer, 10, scheduler=scheduler,
               epoch_stop=lambda stats: True)
    assert done["epochs"] == 1 and done["steps"] == 3 and done["stopped"] is True
    assert optimizer.param_groups[0]["lr"] == 0.5  # never stepped


def test_step_stop_ends_before_the_step_it_refuses():
    model, optimizer, _ = toy()
    before = model.weight.detach().clone()
    asked = []

    def step_stop(logits, labels):
        asked.append(len(labels))
        return len(asked) == 2  # refuse the second step

    done = fit(model, ToyBatches(), optimizer, 5, step_stop=step_stop)
    assert done["stopped"] is True and done["steps"] == 1 and done["epochs"] == 1
    assert not torch.equal(model.weight, before)  # the first step was taken


def test_ascent_drives_accuracy_down_until_the_stop_rule():
    model, optimizer, _ = toy(lr=1.0)
    fit(model, ToyBatches(), optimizer, 5)
    done = fit(model, ToyBatches(), optimizer, 50, ascent=True,
               step_stop=lambda logits, labels: accuracy(logits.argmax(1), labels) <= 0.2)
    assert done["stopped"] is True and done["train_acc"] <= 0.2


def test_zero_epochs_trains_nothing():
    model, optimizer, _ = toy()
    before = model.weight.detach().clone()
    done = fit(model, ToyBatches(), optimizer, 0)
    assert done == {"epochs": 0, "steps": 0, "stopped": False}
    assert torch.equal(model.weight, before)
