"""``python -m distrpc.bench --quick`` and ``distrpc.bench_train --quick`` print every workload
(smoke tests; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")


def _quick(module: str) -> list[dict]:
    """The JSON lines ``python -m module --impl distrpc --quick`` prints."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--impl", "distrpc", "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_bench_quick_prints_every_workload():
    lines = _quick("distrpc.bench")
    workloads = {line["workload"] for line in lines}
    expected = {"init", "latency", "echo", "remote", "async", "bandwidth", "shutdown", "scale"}
    expected.add("rss")
    assert workloads == expected
    assert all(line["impl"] == "distrpc" for line in lines)


def test_bench_train_quick_prints_every_workload():
    lines = _quick("distrpc.bench_train")
    assert {line["workload"] for line in lines} == {"rnn", "mlp", "mlp_phases", "noop"}
    assert all(line["impl"] == "distrpc" for line in lines)
