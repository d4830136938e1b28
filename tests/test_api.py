"""The Python API: every defense's purify(model, images, labels, **options) runs the same algorithm
function as its command line, on a model and images in memory, and writes nothing."""
import random
import re
from pathlib import Path

import pytest
import torch

from defense import anp, fp, fst, ft, ibau, rnp, ulrl
from models import build_model
from utils.core.errors import UserError
from utils.data.datasets import get_dataset, load_clean_dataset
from utils.data.record import load_attack_record
from utils.defenses.session import RECORD_OPTIONS
from tests.helpers import needs_fashion_mnist
from tests.test_defense_anp_rnp_ibau import run_defense

ROOT = Path(__file__).resolve().parents[1]

# Each defense at a few steps: the shape of the call and of its answer, not its efficacy.
QUICK = {
    ulrl: dict(unlearning_epochs=1, relearn_epochs=1, clean_threshold=0.0),
    ft: dict(epochs=1),
    fp: dict(epochs=1, prune_step=0.25),
    fst: dict(epochs=1),
    anp: dict(iterations=4, log_every=2, thresholds=[1.0]),  # fixed: every mask <= 1 is pruned
    rnp: dict(unlearning_epochs=1, recovering_epochs=1, clean_threshold=0.0, thresholds=[1.0]),
    ibau: dict(rounds=1),
}


def toy(seed=0, n=64):
    """A random small CNN (10 classes, 28x28 grey) and n random labelled images."""
    torch.manual_seed(seed)
    model = build_model("smallcnn", 10, in_channels=1, image_size=28)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)
    return model, images, torch.arange(n) % 10


@pytest.mark.parametrize("module", list(QUICK), ids=lambda m: m.__name__.split(".")[-1])
def test_every_defense_purifies_a_copy_and_reports(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written: the folder stays empty
    model, images, labels = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    purified, report = module.purify(model, images, labels, batch_size=32, **QUICK[module])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    assert purified is not model and not purified.training
    assert any(not torch.equal(v, before[k]) for k, v in purified.state_dict().items())
    name = module.__name__.split(".")[-1]
    assert report["method"] == name and report["defense_samples"] == 64
    assert report["classifier"] == "linear" and report["times_s"]["total"] > 0
    assert report["config"]["batch_size"] == 32
    assert list(tmp_path.iterdir()) == []


def test_ulrl_report_holds_the_identification(tmp_path):
    model, images, labels = toy()
    _, report = ulrl.purify(model, images.float() / 255, labels, **QUICK[ulrl])
    found = report["identification"]
    assert len(found["scores"]) == 10 and report["relearning"]["epochs"] == 1
    assert [f["neuron"] for f in report["flagged_neurons"]] == found["flagged"] or \
        report["no_flag_action"] is not None
    assert [row["phase"] for row in report["epochs"]] == ["unlearning", "relearning"]
    sink = report["unlearning"]["predictions_per_class"]  # the unlearned model's predictions
    assert len(sink) == 10 and sum(sink) == report["defense_samples"]


def test_a_dataset_of_pairs_is_accepted():
    model, images, labels = toy(n=20)
    data = torch.utils.data.TensorDataset(images, labels)
    _, report = ft.purify(model, data, epochs=1)
    assert report["defense_samples"] == 20


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: ulrl.purify(m, x, y, alpah=0.3), "unknown key 'alpah' \\(did you mean 'alpha'"),
    (lambda m, x, y: ulrl.purify(m, x, y, alpha=-1), "--alpha must be >= 0"),
    (lambda m, x, y: ulrl.purify(m, x, y, regularizer="l2"), "'regularizer' must be one of"),
    (lambda m, x, y: ulrl.purify(m, x, y[:5]), "one label per image"),
    (lambda m, x, y: ulrl.purify(m, x, y + 10), "labels must be classes 0..9"),
    (lambda m, x, y: ulrl.purify(m, x.float(), y), "float images must hold pixels in \\[0, 1\\]"),
    (lambda m, x, y: ulrl.purify(m, x[0], y), "a tensor \\[N, C, H, W\\]"),
    (lambda m, x, y: ulrl.purify(m, x, y, result_file="r"), "unknown key 'result_file'"),
], ids=["unknown", "bounds", "choices", "labels", "classes", "range", "shape", "record_option"])
def test_bad_calls_are_one_clear_error(call, message):
    model, images, labels = toy(n=20)
    with pytest.raises(UserError, match=message):
        call(model, images, labels)


@needs_fashion_mnist
def test_the_api_matches_the_record_run(small_badnet_record):
    """The same record, defense subset and options through the command line and through purify:
    the same flagged neurons and the same purified weights."""
    args = ["--yaml_path", "config/defense/ulrl/fashion_mnist.yaml", "--unlearning_epochs", 3,
            "--relearn_epochs", 2, "--tag", "api"]
    summary, state = run_defense(ulrl, "ulrl_api", small_badnet_record, *args)
    records, name = small_badnet_record
    record = load_attack_record(records / name)
    spec = get_dataset("fashion_mnist")
    train = load_clean_dataset("fashion_mnist", ROOT / "data", train=True)
    index = random.Random(summary["config"]["seed"]).sample(range(len(train)),
                                                             int(len(train) * 0.01))
    assert (records / name / "defense/ulrl_api/index.txt").read_text().split() == list(map(str, index))
    model = build_model("smallcnn", 10, in_channels=1, image_size=28)
    model.load_state_dict(record.state_dict)
    subset = train.subset(torch.tensor(index))
    options = {k: v for k, v in summary["config"].items()
               if k in ulrl.OPTIONS and k not in RECORD_OPTIONS}
    purified, report = ulrl.purify(model, subset.images, subset.labels, mean=spec.mean,
                                   std=spec.std, hflip=spec.hflip, **options)
    flagged = [f["neuron"] for f in report["flagged_neurons"]]
    assert flagged == [f["neuron"] for f in summary["flagged_neurons"]]
    assert [f["score"] for f in report["flagged_neurons"]] == \
        pytest.approx([f["score"] for f in summary["flagged_neurons"]], abs=1e-4)
    assert all(torch.allclose(purified.state_dict()[k].float(), v.float(), atol=1e-5)
               for k, v in state.items())


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    example = re.search(r"<!-- python api example -->\n```python\n(.*?)```", text, re.S)
    assert example, "README: the Python API example is missing"
    exec(compile(example.group(1), "README example", "exec"), {})
