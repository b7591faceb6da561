"""monkeytrain.statestore on two real ranks (gloo, forked from the session's forkserver, see forked.py): a state
that one rank fails to write stops both ranks with the same one line and exit status 2, leaves no staging
folder and the older state as it was; no rank is left waiting for the other at a barrier."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from forked import exit_codes, free_port, printed, rank_variables, run_in, start

UNEXPECTED_POS = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def save_twice(run_dir: Path, rank: int, failure: str) -> None:
    """Two states saved by every rank, the second failing as `failure` says: "write on rank R" (torch.save,
    as it reports a failing disk), or "publish" (the main process's rename into place)."""
    import torch
    from accelerate import Accelerator

    from monkeytrain.statestore import StateStore

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    store = StateStore(run_dir, accelerator, keep=3)
    store.save(2, {"step": 2}, shared={})
    if failure == f"write on rank {rank}":
        def failing_save(*args, **kwargs):
            raise RuntimeError(UNEXPECTED_POS)
        torch.save = failing_save
    if failure == "publish" and rank == 0:
        def failing_replace(*args, **kwargs):
            raise OSError(errno.EIO, "Input/output error")
        os.replace = failing_replace
    store.save(4, {"step": 4}, shared={})


def save_twice_on_rank(folder: Path, environment: dict[str, str], rank: int, failure: str) -> None:
    """In the child: `save_twice` as the entry point runs it (a UserError: one line, exit 2), into rank<R>.log."""
    from monkeytrain.errors import exits_cleanly_on_user_error

    run_in(folder, f"rank{rank}.log", environment)
    exits_cleanly_on_user_error(save_twice)(folder / "run", rank, failure)


@pytest.mark.parametrize("failure, reason", [("write on rank 0", "unexpected pos 704 vs 598"),
                                             ("write on rank 1", "unexpected pos 704 vs 598"),
                                             ("publish", "Input/output error")])
def test_a_state_one_rank_cannot_write_stops_both_with_one_line_and_no_staging_folder(tmp_path, failure, reason):
    (tmp_path / "run").mkdir()
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MONKEYTRAIN_"))}
    children = [start(save_twice_on_rank, tmp_path, {**environment, **rank_variables(rank, 2, port)}, rank, failure)
                for rank in (0, 1)]
    ended = exit_codes(children, seconds=120)
    logs = [printed(tmp_path / f"rank{rank}.log") for rank in (0, 1)]
    assert ended == [2, 2], f"exit codes {ended}\n" + "\n".join(logs)
    assert not any("Traceback" in log for log in logs), "\n".join(logs)
    expected = (f"monkeytrain: error: cannot write step-00000004 in {tmp_path / 'run' / 'state'} ({reason}); make "
                "that folder writable or pick another --output-dir.")
    assert [log.strip().splitlines()[-1] for log in logs] == [expected] * 2
    state = tmp_path / "run" / "state"
    assert sorted(p.name for p in state.iterdir()) == ["step-00000002"]
    assert sorted(p.name for p in (state / "step-00000002").iterdir()) == [
        "COMPLETE", "model.safetensors", "optimizer.bin", "progress-rank0.pt", "progress-rank1.pt",
        "random_states_0.pkl", "random_states_1.pkl"]
