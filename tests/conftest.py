"""Fixtures shared across test files."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import HANG_GUARD_S
from tests.outcomes import seed_args

ROOT = Path(__file__).resolve().parents[1]


def run_script(script, *args, cwd=ROOT, timeout=HANG_GUARD_S):
    """Run a repository script with this interpreter; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def small_badnet_record(tmp_path_factory):
    """A small BadNets record on Fashion-MNIST with the small CNN (about 15 s on 2 cores):
    10,000 training images, 4 epochs at lr 0.05: C-ACC ~81 %, ASR ~99 % on a 2,000-image test
    subset. Returns (record_dir, record_name). Skips when Fashion-MNIST is not installed."""
    from utils.data.datasets import find_dataset_folder
    try:
        find_dataset_folder("fashion_mnist", ROOT / "data")
    except Exception:
        pytest.skip("Fashion-MNIST not installed (bash sh/install.sh)")
    records = tmp_path_factory.mktemp("shared_record")
    done = run_script("attack/badnet.py", "--yaml_path",
                      ROOT / "config/attack/badnet/fashion_mnist.yaml", "--train_size", 10000,
                      "--test_size", 2000, "--epochs", 4, "--lr", 0.05, "--save_mode", "ram",
                      "--save_folder_name", "badnet_small", "--record_dir", records, *seed_args())
    assert done.returncode == 0, done.stderr
    return records, "badnet_small"
