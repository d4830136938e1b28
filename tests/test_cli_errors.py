"""Bad input ends in one clear error line (exit code 2) and leaves no result behind."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import build_model
from tests.helpers import HANG_GUARD_S, Payload, tiny_record

ROOT = Path(__file__).resolve().parents[1]


def ulrl(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "defense/ulrl.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=HANG_GUARD_S)


def error_line(done) -> str:
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr  # exactly one line, no traceback
    return lines[0]


def test_missing_record(tmp_path):
    line = error_line(ulrl("--result_file", "nope", "--record_dir", tmp_path))
    assert "no attack record" in line and "nope" in line


def test_result_file_required():
    assert "--result_file is required" in error_line(ulrl())


def test_dataset_or_model_disagreeing_with_the_record(tmp_path):
    tiny_record(tmp_path / "r")
    line = error_line(ulrl("--result_file", "r", "--record_dir", tmp_path, "--dataset", "cifar10"))
    assert "--dataset cifar10 disagrees with the record" in line and "fashion_mnist" in line
    line = error_line(ulrl("--result_file", "r", "--record_dir", tmp_path, "--model", "vgg19_bn"))
    assert "--model vgg19_bn disagrees" in line and "smallcnn" in line
    assert not (tmp_path / "r/defense/ulrl/defense_result.pt").exists()


def test_unknown_model_name_in_record(tmp_path):
    tiny_record(tmp_path / "r", model_name="resnet9000")
    line = error_line(ulrl("--result_file", "r", "--record_dir", tmp_path))
    assert "resnet9000" in line and "preactresnet18" in line


def test_malicious_record_refused_without_running_it(tmp_path):
    pwned = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"model_name": "smallcnn", "model": Payload(os.system, f"touch {pwned}")}, folder / "attack_result.pt")
    line = error_line(ulrl("--result_file", "evil", "--record_dir", tmp_path))
    assert "system" in line and "--trust_record" in line
    assert not pwned.exists()


def test_unwritable_output_folder(tmp_path):
    tiny_record(tmp_path / "r")
    (tmp_path / "r/defense").write_text("a file where the output folder should be")
    line = error_line(ulrl("--result_file", "r", "--record_dir", tmp_path))
    assert "not writable" in line and "defense" in line


def test_nan_weights_stop_with_a_clear_error_and_no_result(tmp_path):
    state = build_model("smallcnn", 10, in_channels=1, image_size=28).state_dict()
    state["linear.weight"][:] = float("nan")
    tiny_record(tmp_path / "r", state_dict=state)
    done = ulrl("--result_file", "r", "--record_dir", tmp_path, "--ratio", "0.002")
    assert done.returncode == 2, done.stderr
    assert "not finite" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r/defense/ulrl").exists()  # a failed run publishes nothing


@pytest.mark.parametrize("bad", ["--ratio 0", "--index /does/not/exist"])
def test_bad_subset_options(tmp_path, bad):
    tiny_record(tmp_path / "r")
    line = error_line(ulrl("--result_file", "r", "--record_dir", tmp_path, *bad.split()))
    assert bad.split()[0] in line or "index file" in line
