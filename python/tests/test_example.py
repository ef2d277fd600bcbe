"""The Python examples train torch.nn models across three processes."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "parameter_server.py"


def test_the_parameter_server_example_learns():
    out = subprocess.run(
        [sys.executable, "-m", "distrpc.launch", "--nproc", "3", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    first = [float(m) for m in re.findall(r"step   0 loss ([0-9.]+)", out.stdout)]
    final = float(re.search(r"final loss on held-out data: ([0-9.]+)", out.stdout).group(1))
    assert len(first) == 2, out.stdout
    assert final < min(first) / 10, out.stdout


SPLIT = pathlib.Path(__file__).parents[1] / "examples" / "model_parallel.py"


def test_the_model_parallel_example_learns_with_distributed_autograd():
    out = subprocess.run(
        [sys.executable, "-m", "distrpc.launch", "--nproc", "3", str(SPLIT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    first = float(re.search(r"step   0 loss ([0-9.]+)", out.stdout).group(1))
    final = float(re.search(r"final loss on held-out data: ([0-9.]+)", out.stdout).group(1))
    assert final < first / 10, out.stdout
