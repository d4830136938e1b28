"""sh/slurm_sweep.sh against a real SLURM controller (slow): a 2-record x 2-defense array runs to the
end, and after one task failed, running the same command again submits that pair alone.

Needs sbatch and a controller that answers; `bash sh/slurm_local.sh` starts a single-node one on
this machine (the test's records live in a local temporary folder, so a multi-node cluster would
also need that folder on a shared file system). Run it with
`python -m pytest -q -m slow tests/test_slurm.py`."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import HANG_GUARD_S, needs_fashion_mnist, tiny_record

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, needs_fashion_mnist]

ARRAY_TIMEOUT_S = 1800  # only catches a stuck array: the 2 x 2 one took under 25 s here
# the cheapest defenses, one epoch on 0.2 % of the training set, one thread per task
SWEEP = ["--defenses", "ft fst", "--sbatch", "--cpus-per-task 1 --time 30", "--",
         "--epochs", "1", "--ratio", "0.002", "--threads", "1", "--plots", "false"]


@pytest.fixture(scope="module")
def controller():
    if not all(shutil.which(tool) for tool in ("sbatch", "squeue", "scontrol")):
        pytest.skip("no SLURM here (sbatch, squeue or scontrol not found): bash sh/slurm_local.sh "
                    "installs and starts a single-node one")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        said = " ".join(line.strip() for line in ping.stdout.splitlines() if line.strip("* \n"))
        pytest.skip(f"no SLURM controller answers (scontrol ping: {said}): "
                    "bash sh/slurm_local.sh starts one")


def slurm_sweep(record_dir: Path):
    """Run sh/slurm_sweep.sh with this interpreter's python3 first on PATH (the array tasks
    inherit it); returns (stdout, the submitted job id or None)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    done = subprocess.run(["bash", str(ROOT / "sh/slurm_sweep.sh"), "--record_dir",
                           str(record_dir), *SWEEP], capture_output=True, text=True,
                          timeout=HANG_GUARD_S, cwd=record_dir, env={**os.environ, "PATH": path})
    assert done.returncode == 0, done.stdout + done.stderr
    job = re.search(r"^Submitted batch job (\d+)$", done.stdout, re.M)
    return done.stdout, job and job.group(1)


def wait_for(job: str) -> None:
    """Poll squeue until no task of the array is pending or running."""
    deadline = time.monotonic() + ARRAY_TIMEOUT_S
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], capture_output=True,
                               text=True, timeout=60)
        assert queue.returncode == 0 or "Invalid job id" in queue.stderr, queue.stderr
        if not queue.stdout.strip():
            return
        time.sleep(2)
    pytest.fail(f"SLURM array {job} still queued or running after {ARRAY_TIMEOUT_S} s")


def task_lists(record_dir: Path) -> list[list[str]]:
    """The task lists of the submissions so far, oldest first."""
    lists = sorted((record_dir / "slurm").glob("tasks-*.txt"), key=lambda p: p.stat().st_mtime_ns)
    return [path.read_text().splitlines() for path in lists]


def test_array_runs_every_pair_then_resubmits_only_the_failed_one(controller, tmp_path):
    records = tmp_path / "records"
    for name in ("a", "b"):
        tiny_record(records / name)
    blocker = records / "b/defense/ft"  # a file where (b, ft) writes its folder: that task fails
    blocker.parent.mkdir(parents=True)
    blocker.write_text("")
    summaries = {(r, m): records / r / "defense" / m / "summary.json"
                 for r in ("a", "b") for m in ("ft", "fst")}

    out, job = slurm_sweep(records)
    assert "4 tasks written" in out and job, out
    wait_for(job)
    [tasks] = task_lists(records)
    assert len(tasks) == 4
    failed = next(i for i, line in enumerate(tasks, 1) if "ft.py --result_file b " in line)
    assert "is not writable (it is a file)" in (records / f"slurm/{job}_{failed}.out").read_text()
    assert [pair for pair, path in summaries.items() if not path.is_file()] == [("b", "ft")]
    for (record, method), path in summaries.items():
        if path.is_file():
            summary = json.loads(path.read_text())
            assert summary["method"] == method and Path(summary["record"]).name == record
    finished = {pair: path.stat().st_mtime_ns for pair, path in summaries.items() if path.is_file()}

    blocker.unlink()
    out, job = slurm_sweep(records)
    assert "1 tasks written" in out and job, out
    assert out.count("(existing; --force reruns)") == 3
    wait_for(job)
    assert len(task_lists(records)) == 2 and task_lists(records)[1] == [tasks[failed - 1]]
    assert all(path.is_file() for path in summaries.values())
    assert {pair: summaries[pair].stat().st_mtime_ns for pair in finished} == finished  # not rerun

    out, job = slurm_sweep(records)
    assert job is None and "nothing to run" in out
