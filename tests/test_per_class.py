"""Per-class clean accuracy of a record's model and its defended models."""
import csv

import torch

from models import build_model
from tests.helpers import tiny_record, write_fashion_mnist
from utils.analysis.per_class import main
from utils.data.record import save_defense_result


def test_one_row_per_model_and_a_class_it_always_predicts(tmp_path, capsys):
    record = tiny_record(tmp_path / "r")
    data_root = write_fashion_mnist(tmp_path / "data", n_train=20, n_test=200)
    model = build_model("smallcnn", 10, in_channels=1, image_size=28)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # a defended model that answers class 3 whatever the image
        linear.weight.zero_()
        linear.bias.copy_(torch.arange(10) == 3)
    save_defense_result(record / "defense/ft/defense_result.pt", model_name="smallcnn",
                        num_classes=10, state_dict=model.state_dict())
    main([str(record), "--dataset_path", str(data_root), "--device", "cpu",
          "--out", str(tmp_path / "pc.csv")])
    with open(tmp_path / "pc.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["backdoored", "ft"]
    assert [float(rows[1][f"class_{c}"]) for c in range(10)] == [100.0 * (c == 3) for c in range(10)]
    assert all(0 <= float(rows[0][f"class_{c}"]) <= 100 for c in range(10))
    assert capsys.readouterr().out.splitlines()[0].split() == ["model", *map(str, range(10))]
