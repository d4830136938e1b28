"""Small hostile record files (each well under 1 MiB): what an attacker could hand a defender to
make the loader allocate far more than the file holds. Used by tests/test_hostile_records.py, also
in a subprocess that measures peak memory:

    python -m tests.hostile_helpers DIR    # writes them, loads each, prints peak RSS per file
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import build_model
from tests.helpers import Payload, tiny_record


def image_with_state(state):
    """A PIL image that pickles with `state` instead of its own (None: no state at all)."""
    img = Image.new("L", (1, 1))
    img.__getstate__ = lambda: state
    return img


def _record(folder: Path, **changes) -> Path:
    tiny_record(folder)
    path = folder / "attack_result.pt"
    raw = torch.load(path, weights_only=False)
    for key, value in changes.items():
        raw[key] = value
    torch.save(raw, path)
    return path


def _state(**changes) -> dict:
    state = {"original_index_array": np.arange(4), "poison_indicator": np.ones(4),
             "bd_data_container": {"data_dict": {}}}
    return {**state, **changes}


def _multiarray():
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    return multiarray


HOSTILE_FILES = {
    # 2,000,000 indices in 8 bytes: a stride-0 view of one element
    "stride0_index_array": lambda f: _record(f, bd_test=_state(
        original_index_array=torch.zeros(1, dtype=torch.int64).expand(2_000_000))),
    # a 40,000 x 40,000 weight (6.4 GB as float32) stored as one float
    "stride0_state_dict": lambda f: _record(f, model={
        **build_model("smallcnn", 10, in_channels=1, image_size=28).state_dict(),
        "linear.weight": torch.zeros(1).expand(40_000, 40_000)}),
    # a RAM-mode image that claims 40,000 x 40,000 pixels and holds none
    "image_state_bomb": lambda f: _record(f, bd_test=_state(bd_data_container={"data_dict": {
        np.int64(0): (image_with_state([{}, "L", (40_000, 40_000), None, b"\x00"]), 0, 1)}})),
    # numpy's reconstructor asked for a 40,000 x 40,000 array before its state is set
    "numpy_reconstruct_bomb": lambda f: _record(f, bd_test=_state(poison_indicator=Payload(
        _multiarray()._reconstruct, np.ndarray, (40_000, 40_000), b"b"))),
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(root: str) -> None:
    from utils.core.errors import UserError
    from utils.data.record import load_attack_record
    for name, make in HOSTILE_FILES.items():
        folder = Path(root) / name
        size = make(folder).stat().st_size
        try:
            load_attack_record(folder)
            outcome = "loaded"
        except UserError as e:
            outcome = f"refused: {str(e)[:90]}"
        print(f"{name}: {size} bytes, peak RSS {peak_rss_mib():.0f} MiB, {outcome}")


if __name__ == "__main__":
    main(sys.argv[1])
