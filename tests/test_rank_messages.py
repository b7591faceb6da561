"""How the processes of a launch end: one `monkeytrain: error:` line for an error that every process meets (the
main process's), the line of any process whose error the main process did not meet, and a bug's traceback with
no gloo traceback under it from the process that lost its connection to the failed one.

The store that torchrun's agent keeps for a launch (and `accelerate launch`, which runs torchrun) is a
`TCPStore` served here, in the test's process, its address passed on as torchrun passes it."""

from __future__ import annotations

import errno
import json
import os
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
import torch.distributed as dist

from forked import exit_codes, printed, rank_variables, start, train_rank
from monkeytrain import distributed
from monkeytrain.errors import UserError, exits_cleanly_on_user_error

MISSING = "dataset folder /nowhere does not exist; check --data or $MONKEYTRAIN_DATA."
UNDECODED = "image /data/n0/caf\udce9.png cannot be read; delete it or leave out --strict-data."  # a Latin-1 name
GLOO_LOST = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
             "[127.0.0.1]:19345. This is typically caused by a remote worker crashing. Check the logs of the "
             "remote worker before reporting an error. GLHF!")


@pytest.fixture
def agent_store() -> dist.TCPStore:
    return launchers_store()


def launchers_store() -> dist.TCPStore:
    """The launcher's store, as torchrun's agent serves it: one a launch (the ranks meet in it)."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))


def as_rank(monkeypatch, rank: int, store: dist.TCPStore) -> None:
    """This process as rank `rank` of two, started by torchrun."""
    for name, value in {**rank_variables(rank, 2, store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(name, value)


def ended(failure: BaseException, capsys) -> tuple[int, str]:
    """The exit status and standard error of an entry point that raises `failure`."""
    @exits_cleanly_on_user_error
    def entry_point():
        raise failure

    with pytest.raises(SystemExit) as stopped:
        entry_point()
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize("message", [MISSING, UNDECODED])
def test_the_main_process_says_its_error_and_another_says_nothing_more(monkeypatch, capsys, agent_store, message):
    as_rank(monkeypatch, 0, agent_store)
    printable = message.encode("utf-8", "backslashreplace").decode()  # as on a strict console
    assert ended(UserError(message), capsys) == (2, f"monkeytrain: error: {printable}\n")
    as_rank(monkeypatch, 1, agent_store)
    assert ended(UserError(message), capsys) == (2, "")


@pytest.mark.parametrize("main_outcome", ["class folder n1 has no readable images.", distributed.A_BUG, None])
def test_another_process_says_an_error_the_main_process_did_not_say(monkeypatch, capsys, agent_store, main_outcome):
    """The main process ended otherwise, or tells nothing in time (still running, or killed)."""
    as_rank(monkeypatch, 1, agent_store)
    monkeypatch.setattr(distributed, "MAIN_OUTCOME_SECONDS", 0.2)
    if main_outcome is not None:
        agent_store.set(distributed.main_outcome_key(), main_outcome)
    assert ended(UserError(MISSING), capsys) == (2, f"monkeytrain: error: {MISSING}\n")


def test_every_process_says_its_error_where_no_launchers_store_answers(monkeypatch, capsys, agent_store):
    as_rank(monkeypatch, 1, agent_store)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")  # started without torchrun's agent
    agent_store.set(distributed.main_outcome_key(), MISSING)
    assert ended(UserError(MISSING), capsys) == (2, f"monkeytrain: error: {MISSING}\n")


def test_a_connection_lost_to_a_failed_process_is_one_line(monkeypatch, capsys, agent_store):
    as_rank(monkeypatch, 0, agent_store)
    assert ended(RuntimeError(GLOO_LOST), capsys) == (1, (
        "monkeytrain: error: another process of this run ended (Connection closed by peer [127.0.0.1]:19345); "
        "what it printed says why.\n"))


def test_a_connection_lost_to_the_main_process_that_said_why_says_nothing_more(monkeypatch, capsys, agent_store):
    as_rank(monkeypatch, 1, agent_store)
    agent_store.set(distributed.main_outcome_key(), distributed.A_BUG)
    assert ended(RuntimeError(GLOO_LOST), capsys) == (1, "")


def test_a_bug_of_the_main_process_keeps_its_traceback_and_tells_the_others(monkeypatch, capsys, agent_store):
    as_rank(monkeypatch, 0, agent_store)
    with pytest.raises(ZeroDivisionError):
        exits_cleanly_on_user_error(lambda: 1 / 0)()
    assert agent_store.get(distributed.main_outcome_key()).decode() == distributed.A_BUG
    assert capsys.readouterr().err == ""


def test_other_gloo_errors_are_bugs(monkeypatch, agent_store):
    as_rank(monkeypatch, 1, agent_store)
    with pytest.raises(RuntimeError, match="mismatched sizes"):
        ended(RuntimeError("[gloo/transport/tcp/pair.cc:1] mismatched sizes"), None)


# Two real ranks, forked (see forked.py), with the launcher's store served here.
FLAGS = ["--cpu", "--model", "resnet10t", "--image-size", "32", "--batch-size", "3", "--epochs", "1",
         "--num-workers", "0", "--report-to", "none", "--cpu-threads", "1", "--run-name", "ranks"]


def train_rank_with_a_bug(folder: Path, flags: list[str], environment: dict[str, str], rank: int) -> None:
    """forked.train_rank, the main process failing with a bug (not a UserError) as it writes best.safetensors."""
    if rank == 0:
        from monkeytrain import checkpoint

        def save_checkpoint(*args):
            raise RuntimeError("a bug in writing best.safetensors")

        checkpoint.save_checkpoint = save_checkpoint
    train_rank(folder, flags, environment, rank)


def two_ranks(tmp_path: Path, agent_store: dist.TCPStore, flags: list[str], target=train_rank) -> tuple[list, list]:
    """Both ranks' exit statuses and logs."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MONKEYTRAIN_"))}
    environment.update(TORCHELASTIC_USE_AGENT_STORE="True", OMP_NUM_THREADS="1")
    flags = ["--cache-dir", str(tmp_path / "cache"), *FLAGS, *flags]
    children = [start(target, tmp_path, flags, {**environment, **rank_variables(rank, 2, agent_store.port)}, rank)
                for rank in (0, 1)]
    ended = exit_codes(children, seconds=300)
    return ended, [printed(tmp_path / f"rank{rank}.log") for rank in (0, 1)]


def test_an_error_that_both_ranks_meet_is_said_once(tmp_path, agent_store):
    ended, logs = two_ranks(tmp_path, agent_store, ["--data", str(tmp_path / "nowhere")])
    assert ended == [2, 2], logs
    assert logs[0].strip().splitlines()[-1] == (f"monkeytrain: error: dataset folder {tmp_path / 'nowhere'} does "
                                                "not exist; check --data or $MONKEYTRAIN_DATA.")
    assert "monkeytrain: error:" not in logs[1] and "Traceback" not in logs[1], logs[1]


def test_a_bug_of_the_main_rank_leaves_no_gloo_traceback_under_its_own(tmp_path, agent_store):
    from conftest import write_image_folder

    data = write_image_folder(tmp_path / "data", classes=3, per_class=6)
    ended, logs = two_ranks(tmp_path, agent_store, ["--data", str(data)], train_rank_with_a_bug)
    assert ended == [1, 1], logs
    assert "Traceback" in logs[0] and logs[0].strip().endswith("RuntimeError: a bug in writing best.safetensors")
    assert "Traceback" not in logs[1] and "gloo" not in logs[1], logs[1]


def train_rank_whose_main_write_fails(file_name: str, error_number: int, folder: Path, flags: list[str],
                                      environment: dict[str, str], rank: int) -> None:
    """forked.train_rank, the main process's write of `file_name` failing with `error_number`: EROFS as a
    folder remounted read-only once checked (chmod would not stop the root user that tests may run as), ENOSPC
    as a disk that filled up."""
    if rank == 0:
        from monkeytrain import storage

        real_write_file = storage._write_file

        def write_file(path: Path, *args) -> None:
            if path.name.startswith(f".{file_name}.tmp"):
                raise OSError(error_number, os.strerror(error_number), str(path))
            real_write_file(path, *args)

        storage._write_file = write_file
    train_rank(folder, flags, environment, rank)


def test_a_record_the_main_rank_cannot_write_before_training_ends_both_ranks_alike(tmp_path, agent_store):
    """The main process alone writes config.yaml and data_manifest.json: the other rank ended at its next collective,
    on the lost connection (exit status 1), rather than with the main process's line (status 2)."""
    from conftest import write_image_folder

    data = write_image_folder(tmp_path / "data", classes=3, per_class=6)
    ended, logs = two_ranks(tmp_path, agent_store, ["--data", str(data)],
                             partial(train_rank_whose_main_write_fails, "config.yaml", errno.EROFS))
    assert ended == [2, 2], logs
    assert logs[0].strip().splitlines()[-1] == (
        f"monkeytrain: error: cannot write config.yaml in runs/ranks ({os.strerror(errno.EROFS)}); make that folder "
        "writable or pick another --output-dir.")
    assert "monkeytrain: error:" not in logs[1] and "Traceback" not in logs[1], logs[1]  # said once, by the main one


def test_metrics_the_main_rank_cannot_trim_on_resuming_end_both_ranks_alike(tmp_path, agent_store):
    """A resume from a state older than the newest epochs logged rewrites metrics.jsonl without them (the main
    process alone): the other rank ended at its next collective, on the lost connection (exit status 1)."""
    from conftest import write_image_folder

    data = write_image_folder(tmp_path / "data", classes=3, per_class=6)
    flags = ["--data", str(data), "--epochs", "2", "--save-every", "1"]
    assert two_ranks(tmp_path, agent_store, flags)[0] == [0, 0]
    run = tmp_path / "runs" / "ranks"
    (run / "results.json").unlink()  # as if killed after its last epoch's line: its newest state is older
    ended, logs = two_ranks(tmp_path, launchers_store(), [*flags, "--resume", "auto"],  # a new launch's
                            partial(train_rank_whose_main_write_fails, "metrics.jsonl", errno.ENOSPC))
    assert ended == [2, 2], logs
    assert logs[0].strip().splitlines()[-1].startswith(
        "monkeytrain: error: no space left on the device of runs/ranks to write metrics.jsonl ("), logs[0]
    assert "monkeytrain: error:" not in logs[1] and "Traceback" not in logs[1], logs[1]


def test_results_json_the_main_rank_cannot_write_ends_both_ranks_alike(tmp_path, agent_store):
    """The main process alone writes results.json, after the last collective: the other rank ended with status 0,
    as if the run had finished, and a launcher that waits for every rank's status took it for one that half did."""
    from conftest import write_image_folder

    data = write_image_folder(tmp_path / "data", classes=3, per_class=6)
    ended, logs = two_ranks(tmp_path, agent_store, ["--data", str(data)],
                             partial(train_rank_whose_main_write_fails, "results.json", errno.ENOSPC))
    assert ended == [2, 2], logs
    checkpoint = Path("runs", "ranks", "best.safetensors")
    last = logs[0].strip().splitlines()[-1]
    assert last.startswith("monkeytrain: error: no space left on the device of runs/ranks to write results.json ("), \
        last
    assert last.endswith(f"; training had ended, and {checkpoint} (epoch 1) is saved: free some space and score it on "
                         f"the test split with `monkeytrain evaluate --checkpoint {checkpoint} "
                         f"{data / 'validation' / 'validation'}` rather than train again."), last
    assert "monkeytrain: error:" not in logs[1] and "Traceback" not in logs[1], logs[1]  # said once, by the main one


def train_rank_whose_wandb_finds_the_disk_full(folder: Path, flags: list[str], environment: dict[str, str],
                                                rank: int) -> None:
    """forked.train_rank, the main process's W&B run finding no space as it copies the plots into its folder."""
    if rank == 0:
        import shutil

        real_copy = shutil.copy

        def copy(source, destination, *args, **kwargs):
            if f"{os.sep}wandb{os.sep}" in str(destination):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_copy(source, destination, *args, **kwargs)

        shutil.copy = copy
    train_rank(folder, flags, environment, rank)


def test_wandbs_final_files_the_main_rank_cannot_write_cost_one_warning_and_the_run_ends_well(tmp_path, agent_store,
                                                                                            monkeypatch):
    """W&B's end-of-run files are the main process's alone, and its folder may be full alone (WANDB_DIR elsewhere):
    that ended every rank before results.json was written (before that, the other rank waited for the main one at
    results.json's agreement, and ended on the lost connection). Now a warning, as for the plots."""
    from conftest import write_image_folder

    for name in [name for name in os.environ if name.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")  # its files in the run's folder, no account asked for
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = write_image_folder(tmp_path / "data", classes=3, per_class=6)
    ended, logs = two_ranks(tmp_path, agent_store, ["--data", str(data), "--report-to", "wandb"],
                            train_rank_whose_wandb_finds_the_disk_full)
    assert ended == [0, 0], logs
    assert json.loads((tmp_path / "runs" / "ranks" / "results.json").read_text())["test_accuracy"] is not None
    warned = [line for log in logs for line in log.splitlines() if "the W&B run's final files" in line]
    assert len(warned) == 1 and warned[0].startswith("monkeytrain: warning: no space left on the device for"), logs
    assert "`wandb sync " in warned[0] and warned[0] in logs[0], warned  # by the main process, the offline run's
