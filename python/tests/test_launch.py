"""``python -m distrpc.launch`` and torchrun start groups that meet by env://."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import operator, os
    import distrpc.rpc as rpc

    rank = int(os.environ["RANK"])
    rpc.init_rpc(f"worker{rank}")  # rank, world size and store from the environment
    peer = f"worker{(rank + 1) % int(os.environ['WORLD_SIZE'])}"
    print("sum", rpc.rpc_sync(peer, operator.add, args=(rank, 100)))
    print("token", len(os.environ.get("DISTRPC_AUTH_TOKEN", "")))
    rpc.shutdown()
    """
)


def test_launch_starts_a_group_by_env(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [sys.executable, "-m", "distrpc.launch", "--nproc", "3", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for rank in range(3):
        assert f"[{rank}] sum {rank + 100}" in out.stdout, out.stdout
        # The launcher gave its group a token: the ranks authenticated each other.
        assert f"[{rank}] token 64" in out.stdout, out.stdout


def test_torchrun_starts_a_group_by_env(tmp_path):
    # torchrun's agent hosts a torch store on MASTER_PORT: rank 0 posts distrpc's there.
    # (torchrun does not keep the ranks' lines apart: each rank writes its result to a file.)
    pytest.importorskip("torch")
    script = tmp_path / "job.py"
    script.write_text(
        SCRIPT.replace(
            'print("sum", rpc.rpc_sync(peer, operator.add, args=(rank, 100)))',
            "total = rpc.rpc_sync(peer, operator.add, args=(rank, 100))\n"
            f"open(f'{tmp_path}/rank{{rank}}', 'w').write(str(total))",
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    sums = [(tmp_path / f"rank{rank}").read_text() for rank in range(3)]
    assert sums == ["100", "101", "102"]


def test_a_failing_rank_fails_the_launch(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, sys, time\nsys.exit(7) if os.environ['RANK'] == '1' else time.sleep(60)\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "distrpc.launch", "--nproc", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 7, (out.returncode, out.stderr)
    assert "rank 1 failed" in out.stderr
