"""Fixtures: groups of worker processes started by the test, bounded, and cleaned up."""

from __future__ import annotations

import multiprocessing as mp
from typing import Callable

import pytest


@pytest.fixture
def run_group(tmp_path):
    """Runs ``target(rank, world_size, init_method, results)`` in ``world_size`` fresh
    processes that meet through a file store; returns what each put in ``results``. Each must
    exit 0, unless ``exit_codes`` says otherwise (a rank meant to die puts nothing)."""

    def run(
        target: Callable,
        world_size: int,
        timeout: float = 60.0,
        exit_codes: dict | None = None,
        store: str = "store",
    ) -> dict:
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        init_method = f"file://{tmp_path}/{store}"
        procs = [
            ctx.Process(target=target, args=(rank, world_size, init_method, results))
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            got = {}
            expected = {rank: 0 for rank in range(world_size)}
            expected.update(exit_codes or {})
            for _ in range(sum(1 for code in expected.values() if code == 0)):
                rank, value = results.get(timeout=timeout)
                got[rank] = value
            for rank, p in enumerate(procs):
                p.join(timeout)
                assert p.exitcode == expected[rank], f"rank {rank} exited with {p.exitcode}"
            return got
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()

    return run
