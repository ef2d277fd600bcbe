"""``python -m distrpc.bench --quick`` and ``distrpc.bench_train --quick`` print every workload
(smoke tests; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")


def _quick(module: str, *more: str) -> list[dict]:
    """The JSON lines ``python -m module --impl distrpc --quick [more]`` prints."""
    return _quick_impl(module, "distrpc", *more)


def _quick_impl(module: str, impl: str, *more: str) -> list[dict]:
    """The JSON lines ``python -m module --impl IMPL --quick [more]`` prints."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--impl", impl, "--quick", *more],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


#: Stands for the ``distrpc`` binary: ``bench NAME --calls N`` prints NAME's line, its p50
#: 10 µs for the no-op and 25 µs for ``remote``; ``bench bandwidth --bytes N`` 2 GB/s.
_FAKE_RUST = """#!/bin/sh
if [ "$2" = bandwidth ]; then
  echo '{"workload": "bandwidth", "bytes": '"$4"', "gb_per_s": 2.0}'
  exit 0
fi
p50=10.0
[ "$2" = remote ] && p50=25.0
echo '{"workload": "'"$2"'", "calls": '"$4"', "p50_us": '"$p50"'}'
"""


def test_bench_quick_prints_every_workload_and_the_ratios_to_rust(tmp_path):
    rust = tmp_path / "distrpc"
    rust.write_text(_FAKE_RUST)
    rust.chmod(0o755)
    lines = _quick("distrpc.bench", "--rust", str(rust))
    ratios = lines.pop()
    workloads = {line["workload"] for line in lines if line["impl"] == "distrpc"}
    expected = {"init", "latency", "echo", "remote", "async", "bandwidth", "shutdown", "scale"}
    expected.add("rss")
    assert workloads == expected
    rust_lines = [line for line in lines if line["impl"] == "rust"]
    assert rust_lines == [
        {"workload": "latency", "p50_us": 10.0, "impl": "rust"},
        {"workload": "remote", "p50_us": 25.0, "impl": "rust"},
        {"workload": "bandwidth", "bytes": 16 << 20, "gb_per_s": 2.0, "impl": "rust"},
    ]  # (a quick run sends 16 MiB at most)
    python = {
        line["workload"]: line["p50_us"]
        for line in lines
        if line["impl"] == "distrpc" and "p50_us" in line
    }
    assert ratios["python_over_rust"] == round(python["latency"] / 10.0, 3)
    assert ratios["remote_over_latency"] == {
        "python": round(python["remote"] / python["latency"], 3),
        "rust": 2.5,
    }
    (gbps,) = (
        line["gb_per_s"]
        for line in lines
        if line["impl"] == "distrpc" and line.get("bytes") == 16 << 20
    )
    assert ratios["bandwidth_over_rust"] == {str(16 << 20): round(gbps / 2.0, 3)}


def test_bench_train_quick_prints_every_workload():
    lines = _quick("distrpc.bench_train")
    workloads = {line["workload"]: line for line in lines}
    assert set(workloads) == {"rnn", "mlp", "rnn_local", "mlp_local", "mlp_phases", "noop", "cold"}
    assert all(line["impl"] == "distrpc" for line in lines)
    runs = workloads["cold"]["runs_us"]
    assert set(runs) == {"none", "1ms", "10ms"}
    assert all(len(r) == 4 and all(us > 0 for us in r) for r in runs.values())


def test_bench_train_raw_floor_quick_prints_its_two_steps():
    lines = _quick_impl("distrpc.bench_train", "raw")
    assert [(line["workload"], line["impl"]) for line in lines] == [("rnn", "raw"), ("mlp", "raw")]
    assert all(0 < line["p50_ms"] <= line["p90_ms"] for line in lines)


class _Exited:
    """A process as ``bench_train._result`` looks at it."""

    def __init__(self, exitcode):
        self.exitcode = exitcode


def test_bench_train_stops_at_a_failed_workload_or_a_dead_worker():
    import queue

    from distrpc import bench_train

    results = queue.Queue()
    results.put(bench_train._Failed("distrpc, mlp:\nTraceback: ..."))
    with pytest.raises(RuntimeError, match="a workload failed on distrpc, mlp"):
        bench_train._result(results, [_Exited(None)], 60)
    # Nothing comes and a worker is gone: at once, not after the timeout.
    with pytest.raises(RuntimeError, match=r"a worker exited .*\[\(1, -11\)\]"):
        bench_train._result(results, [_Exited(None), _Exited(-11)], 60)
    results.put({"p50_ms": 1.0})
    assert bench_train._result(results, [_Exited(None)], 60) == {"p50_ms": 1.0}
