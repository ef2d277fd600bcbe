"""Fixtures: groups of worker processes started by the test, bounded, and cleaned up."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest


@pytest.fixture
def run_group(tmp_path):
    """Runs ``target(rank, world_size, init_method, results)`` in ``world_size`` fresh
    processes that meet through a file store; returns what each put in ``results``. Each must
    exit 0, unless ``exit_codes`` says otherwise (a rank meant to die puts nothing).

    A rank in ``commands`` runs that command instead (a Rust worker), with ``RANK``,
    ``WORLD_SIZE`` and ``DISTRPC_INIT_METHOD`` set; what it printed is its result."""

    def run(
        target: Callable,
        world_size: int,
        timeout: float = 60.0,
        exit_codes: dict | None = None,
        store: str = "store",
        commands: dict | None = None,
    ) -> dict:
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        init_method = f"file://{tmp_path}/{store}"
        commands = commands or {}
        procs = {
            rank: ctx.Process(target=target, args=(rank, world_size, init_method, results))
            for rank in range(world_size)
            if rank not in commands
        }
        env = dict(os.environ, WORLD_SIZE=str(world_size), DISTRPC_INIT_METHOD=init_method)
        external = {
            rank: subprocess.Popen(
                command,
                env=dict(env, RANK=str(rank)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank, command in commands.items()
        }
        for p in procs.values():
            p.start()
        try:
            got = {}
            expected = {rank: 0 for rank in range(world_size)}
            expected.update(exit_codes or {})
            for _ in range(sum(1 for r, code in expected.items() if code == 0 and r in procs)):
                rank, value = results.get(timeout=timeout)
                got[rank] = value
            for rank, p in procs.items():
                p.join(timeout)
                assert p.exitcode == expected[rank], f"rank {rank} exited with {p.exitcode}"
            for rank, p in external.items():
                out, _ = p.communicate(timeout=timeout)
                assert p.returncode == expected[rank], (
                    f"rank {rank} exited with {p.returncode}:\n{out}"
                )
                got[rank] = out
            return got
        finally:
            for p in procs.values():
                if p.is_alive():
                    p.kill()
                    p.join()
            for p in external.values():
                if p.poll() is None:
                    p.kill()
                    p.communicate()

    return run


@pytest.fixture(scope="session")
def rust_worker() -> str:
    """The path of distrpc's Rust test worker (``crates/distrpc-testkit``), built by cargo
    (already built when ``scripts/test`` ran the Rust tests first)."""
    if shutil.which("cargo") is None:
        pytest.skip("cargo (the Rust toolchain) is needed to build the Rust worker")
    build = subprocess.run(
        ["cargo", "build", "-p", "distrpc-testkit", "--bin", "distrpc-test-worker"]
        + ["--message-format=json-render-diagnostics"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert build.returncode == 0, build.stderr
    for line in build.stdout.splitlines():
        message = json.loads(line)
        if message.get("target", {}).get("name") == "distrpc-test-worker" and message.get(
            "executable"
        ):
            return message["executable"]
    raise AssertionError(f"cargo built no distrpc-test-worker:\n{build.stdout}")
