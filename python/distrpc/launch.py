"""``python -m distrpc.launch --nproc N script.py [args...]``: starts N worker processes on
this machine with torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), so that ``init_rpc`` meets them by ``env://``. Output lines
are prefixed with the rank; when one process fails, the others are stopped (SIGTERM, then
SIGKILL) and the launch exits with its code. The Rust launcher (``distrpc launch``) does the
work."""

from __future__ import annotations

import argparse
import sys

from ._core import launch


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and runs the group; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m distrpc.launch", description=__doc__)
    parser.add_argument("--nproc", "--nproc-per-node", type=int, required=True)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=0)
    parser.add_argument("script", help="the Python script each process runs")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    command = [sys.executable, opts.script, *opts.args]
    return launch(opts.nproc, command, opts.master_addr, opts.master_port)


if __name__ == "__main__":
    sys.exit(main())
