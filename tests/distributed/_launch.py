"""Run a worker function in ``world_size`` fresh processes joined by a gloo process group.

Each process gets ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT``, calls
``init_process_group("gloo")``, runs ``worker(rank, world_size, outdir, *args)`` and always
destroys the group. A traceback is written to ``outdir/error{rank}.txt``; a worker may
write ``outdir/skip.txt`` to say the feature is unavailable on this torch. The parent
waits at most ``timeout`` seconds (a hang guard, not a speed test) and kills the rest.
"""
from __future__ import annotations

import datetime
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(worker, rank, world_size, port, outdir, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        worker(rank, world_size, Path(outdir), *args)
    except BaseException:
        Path(outdir, f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run(worker, outdir, *args, world_size: int = 2, timeout: float = 240.0) -> None:
    """Run ``worker`` on ``world_size`` ranks; fail with the workers' tracebacks, skip on ``skip.txt``."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(worker, r, world_size, port, str(outdir), args)) for r in range(world_size)]
    for p in procs:
        p.start()
    hung = []
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            hung.append(p)
    for p in hung + [p for p in procs if p.is_alive()]:
        p.kill()
        p.join(10)
    errors = "\n".join(f.read_text() for f in sorted(Path(outdir).glob("error*.txt")))
    skip = Path(outdir, "skip.txt")
    if skip.exists() and not errors:
        pytest.skip(skip.read_text())
    if hung:
        pytest.fail(f"{len(hung)} worker(s) still running after {timeout} s (deadlock?)\n{errors}")
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes) or errors:
        pytest.fail(f"workers exited with {codes}\n{errors}")


def run_and_load(worker, outdir, world_size: int = 2) -> list:
    """:func:`run`, then every rank's saved results (``rank<r>.pt``)."""
    import torch

    run(worker, outdir, world_size=world_size)
    return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
