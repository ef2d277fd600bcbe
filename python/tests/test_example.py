"""The Python examples train torch.nn models across three processes."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


def _launched(example: str) -> tuple[list[float], float]:
    """Runs ``example`` on three processes: the losses printed at step 0 and the final loss on
    held-out data."""
    out = subprocess.run(
        [sys.executable, "-m", "distrpc.launch", "--nproc", "3", str(EXAMPLES / example)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    first = [float(m) for m in re.findall(r"step   0 loss ([0-9.]+)", out.stdout)]
    final = float(re.search(r"final loss on held-out data: ([0-9.]+)", out.stdout).group(1))
    return first, final


def test_the_parameter_server_example_learns():
    first, final = _launched("parameter_server.py")
    assert len(first) == 2  # one line per trainer
    assert final < min(first) / 10


def test_the_model_parallel_example_learns_with_distributed_autograd():
    first, final = _launched("model_parallel.py")
    assert len(first) == 1  # the one trainer
    assert final < first[0] / 10
