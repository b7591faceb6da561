"""Runs of train.main in processes of their own, forked from one interpreter that has imported it.

A fresh interpreter spends about 7 s importing torch, timm and Accelerate. Runs that need a process
of their own but no launcher (a run that SIGKILLs itself, the ranks of a two-process run whose
launch is not what is tested) are forked from a forkserver, which pays for the imports once a
session. Not forked from the pytest process: it has other threads (conftest's background jobs), and
a child forked while one of them holds a lock waits forever. A context of its own leaves the default
start method, which DataLoader workers use, as it was.

The child side (`run_in`, `train_rank`) prints into a file in its folder; the parent side
(`exit_codes`, `train_ranks`) waits, for at most SECONDS, and shows those files when a run fails.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Callable

FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["monkeytrain.train"])  # read when the first child starts the server
SECONDS = 600  # the most a run may take


def start(target: Callable, *args) -> BaseProcess:
    child = FORKSERVER.Process(target=target, args=args)
    child.start()
    return child


def exit_codes(children: list[BaseProcess], seconds: float = SECONDS) -> list[int | None]:
    """How each child ended (None: still running after `seconds`, then killed)."""
    deadline = time.monotonic() + seconds
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    ended = [child.exitcode for child in children]  # before the kill below, which must not count as theirs
    for child in children:
        child.kill()  # one still running; a finished one is left alone
        child.join()
    return ended


def printed(path: Path) -> str:
    """The end of what a child printed into `path`."""
    return path.read_text()[-5000:] if path.is_file() else f"({path.name}: nothing, it failed before it began)"


def run_in(folder: Path, output: str, environment: dict[str, str] | None = None) -> None:
    """In the child: work in `folder` (with `environment`, when given), printing into folder/output."""
    os.chdir(folder)
    if environment is not None:
        os.environ.clear()
        os.environ.update(environment)
    with open(output, "w") as file:  # the descriptors: what C code prints goes there too
        os.dup2(file.fileno(), sys.stdout.fileno())
        os.dup2(file.fileno(), sys.stderr.fileno())
    sys.stdout.reconfigure(line_buffering=True)  # a killed child loses what is still buffered


def train_rank(folder: Path, flags: list[str], environment: dict[str, str], rank: int) -> None:
    """In the child: train.main(flags) with `environment`, printing into folder/rank<rank>.log."""
    from monkeytrain import train

    run_in(folder, f"rank{rank}.log", environment)
    train.main(flags)


def train_ranks(folder: Path, flags: list[str], environment: dict[str, str], ranks: int = 1) -> None:
    """train.main(flags) in `ranks` processes on this machine, which must all end with status 0.
    Several are started as torchrun --standalone would start them: with the variables that
    torch.distributed's env:// rendezvous reads, on a free port."""
    port = free_port()
    children = [start(train_rank, folder, flags, {**environment, **rank_variables(rank, ranks, port)}, rank)
                for rank in range(ranks)]
    ended = exit_codes(children)
    assert ended == [0] * ranks, f"exit codes {ended}\n" + "\n".join(
        printed(folder / f"rank{rank}.log") for rank in range(ranks))


def rank_variables(rank: int, ranks: int, port: int) -> dict[str, str]:
    if ranks == 1:
        return {}
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
