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
    workloads = {line["workload"]: line for line in lines}
    assert set(workloads) == {"rnn", "mlp", "rnn_local", "mlp_local", "mlp_phases", "noop", "cold"}
    assert all(line["impl"] == "distrpc" for line in lines)
    runs = workloads["cold"]["runs_us"]
    assert set(runs) == {"none", "1ms", "10ms"}
    assert all(len(r) == 4 and all(us > 0 for us in r) for r in runs.values())
