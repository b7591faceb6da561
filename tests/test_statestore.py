"""monkeytrain.statestore: publishing, retiring and loading saved states, and choosing the one to resume."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from monkeytrain import storage
from monkeytrain.errors import UserError
from conftest import train_here
from resume_checks import interrupted
from monkeytrain.statestore import (COMPLETE, STATE_PREFIX, StateStore, agree_on_state, recorded_sizes, resolve_resume,
                                    resumed_state, state_dirs)
from monkeytrain.storage import DiskFull, WriteFailed, folder_size, human_size


@pytest.fixture
def trained(cpu_accelerator):
    """A tiny model and a momentum optimizer, prepared, after one step (so the optimizer has state)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = cpu_accelerator.prepare(model, optimizer)
    take_a_step(model, optimizer)
    return model, optimizer


def take_a_step(model, optimizer) -> None:
    model(torch.randn(5, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def momentum(optimizer) -> list[torch.Tensor]:
    return [optimizer.state[p]["momentum_buffer"].clone() for p in optimizer.param_groups[0]["params"]]


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def incomplete_state(run_dir: Path, step: int) -> Path:
    """A state folder as a kill mid-copy could leave it: files, but no COMPLETE marker."""
    folder = run_dir / "state" / f"{STATE_PREFIX}{step:08d}"
    folder.mkdir(parents=True)
    (folder / "progress-rank0.pt").write_bytes(b"half")
    return folder


def test_a_saved_state_is_published_complete_and_load_restores_it(tmp_path, cpu_accelerator, trained):
    model, optimizer = trained
    store = StateStore(tmp_path, cpu_accelerator, keep=3)
    saved_weight, saved_momentum = model.weight.detach().clone(), momentum(optimizer)
    final = store.save(12, {"progress": {"epoch": 2, "batch": 5}}, shared={"averager": {"updates": 7}})

    assert final == tmp_path / "state" / "step-00000012"
    assert (final / COMPLETE).is_file()
    assert names_in(tmp_path / "state") == ["step-00000012"]  # no staging folder left behind
    assert state_dirs(tmp_path) == [final]

    take_a_step(model, optimizer)  # the weights and momentum move on after the save
    assert not torch.equal(model.weight.detach(), saved_weight)
    mine, main = StateStore(tmp_path, cpu_accelerator, keep=3).load(final)
    # one process: this rank is the main rank, so its extras hold `shared` too
    assert mine == main == {"progress": {"epoch": 2, "batch": 5}, "averager": {"updates": 7}}
    assert torch.equal(model.weight.detach(), saved_weight)
    for restored, saved in zip(momentum(optimizer), saved_momentum):
        assert torch.equal(restored, saved)


def test_only_the_newest_keep_states_stay(tmp_path, cpu_accelerator, trained):
    store = StateStore(tmp_path, cpu_accelerator, keep=2)
    for step in (8, 9, 10):  # 10 after 9: the zero padding keeps name order numeric
        store.save(step, {"step": step}, shared={})
    assert names_in(tmp_path / "state") == ["step-00000009", "step-00000010"]


def test_saving_the_same_step_twice_replaces_it(tmp_path, cpu_accelerator, trained):
    store = StateStore(tmp_path, cpu_accelerator, keep=3)
    store.save(4, {"saved": "first"}, shared={})
    final = store.save(4, {"saved": "second"}, shared={})
    assert names_in(tmp_path / "state") == ["step-00000004"]
    mine, _ = store.load(final)
    assert mine == {"saved": "second"}


def test_a_kill_while_the_replaced_copy_of_a_step_is_deleted_leaves_the_new_one(tmp_path, cpu_accelerator, trained,
                                                                                monkeypatch):
    """With --keep-states 1 the step saved twice is the only state: it must never be missing."""
    store = StateStore(tmp_path, cpu_accelerator, keep=1)
    store.save(4, {"saved": "first"}, shared={})

    def killed_while_deleting(path, ignore_errors=False):
        if Path(path).exists():
            raise KeyboardInterrupt  # stands in for a SIGKILL in the middle of a long deletion
    monkeypatch.setattr("monkeytrain.statestore.shutil.rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        store.save(4, {"saved": "second"}, shared={})
    monkeypatch.undo()
    (state,) = state_dirs(tmp_path)
    assert store.load(state)[0] == {"saved": "second"}


def test_the_next_save_sweeps_what_an_interrupted_save_or_retirement_left(tmp_path, cpu_accelerator, trained):
    root = tmp_path / "state"
    for leftover in (".tmp-step-00000006", ".tmp-retired-step-00000002"):
        (root / leftover).mkdir(parents=True)
        (root / leftover / "model.safetensors").write_bytes(b"partial")
    StateStore(tmp_path, cpu_accelerator, keep=3).save(7, {}, shared={})
    assert names_in(root) == ["step-00000007"]


def test_a_folder_without_complete_is_not_a_state(tmp_path, cpu_accelerator, trained):
    complete = StateStore(tmp_path, cpu_accelerator, keep=3).save(3, {}, shared={})
    incomplete_state(tmp_path, 5)  # newer, but never marked complete
    (tmp_path / "state" / "other").mkdir()
    (tmp_path / "state" / "other" / COMPLETE).write_text("complete\n")  # complete, but not a step- folder
    assert state_dirs(tmp_path) == [complete]
    assert resolve_resume("auto", tmp_path) == complete


def test_resolve_resume_starts_fresh_without_a_request_or_a_state(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # no state folder at all
    (tmp_path / "state").mkdir()
    assert resolve_resume("auto", tmp_path) is None  # an empty one


def test_resolve_resume_auto_picks_the_newest_and_a_given_state_is_taken_as_is(tmp_path, cpu_accelerator, trained):
    store = StateStore(tmp_path, cpu_accelerator, keep=5)
    older, newer = store.save(9, {}, shared={}), store.save(10, {}, shared={})
    assert state_dirs(tmp_path) == [older, newer]
    assert resolve_resume("auto", tmp_path) == newer
    assert resolve_resume(str(older), tmp_path) == older


def test_resuming_from_an_incomplete_folder_says_to_use_resume_auto(tmp_path):
    folder = incomplete_state(tmp_path, 5)
    with pytest.raises(UserError) as raised:
        resolve_resume(str(folder), tmp_path)
    message = str(raised.value)
    assert str(folder) in message and "--resume auto" in message


def test_a_state_missing_its_progress_file_says_so_and_names_the_state_before(tmp_path, cpu_accelerator, trained):
    store = StateStore(tmp_path, cpu_accelerator, keep=3)
    earlier, final = store.save(1, {"step": 1}, shared={}), store.save(2, {"step": 2}, shared={})
    (final / "progress-rank0.pt").unlink()  # by hand: not a state of another number of processes
    with pytest.raises(UserError) as raised:
        store.load(final)
    assert str(raised.value) == (f"the saved state {final} is missing progress-rank0.pt; move it away and --resume "
                                 f"auto takes the one before ({earlier}), or start a new run.")
    (earlier / "progress-rank0.pt").unlink()  # the oldest: no state before it to name
    with pytest.raises(UserError, match=r"is missing progress-rank0.pt; start a new run\.$"):
        store.load(earlier)


def two_states(tmp_path, accelerator) -> tuple[StateStore, Path, Path]:
    """A store with two states, each keeping a copy of a run file (as the data record is kept)."""
    record = tmp_path / "data_manifest.json"
    record.write_text('{"files": {}}')
    store = StateStore(tmp_path, accelerator, keep=3)
    return store, store.save(1, {"step": 1}, shared={}, copies=[record]), store.save(2, {"step": 2}, shared={},
                                                                                      copies=[record])


def move_away_or_start_again(earlier: Path) -> str:
    return f"move it away and --resume auto takes the one before ({earlier}), or start a new run."


# Accelerate's load_state passes over a missing or damaged random_states_0.pkl without a word: the run would
# resume with other randomness. A missing model was named pytorch_model.bin, a file no save writes.
@pytest.mark.parametrize("piece", ["random_states_0.pkl", "model.safetensors", "optimizer.bin", "progress-rank0.pt",
                                   "data_manifest.json"])
def test_a_state_missing_any_file_it_was_saved_with_is_refused_naming_it(tmp_path, cpu_accelerator, trained, piece):
    store, earlier, final = two_states(tmp_path, cpu_accelerator)
    assert sorted(recorded_sizes(final)) == sorted(name for name in names_in(final) if name != COMPLETE)
    (final / piece).unlink()
    with pytest.raises(UserError) as raised:
        store.load(final)
    assert str(raised.value) == f"the saved state {final} is missing {piece}; {move_away_or_start_again(earlier)}"


@pytest.mark.parametrize("piece", ["random_states_0.pkl", "optimizer.bin"])
def test_a_state_with_a_truncated_file_is_refused_naming_it(tmp_path, cpu_accelerator, trained, piece):
    store, earlier, final = two_states(tmp_path, cpu_accelerator)
    size = (final / piece).stat().st_size
    with open(final / piece, "r+b") as handle:
        handle.truncate(10)  # a copy cut short, a disk that lost the end of the file
    with pytest.raises(UserError) as raised:
        store.load(final)
    assert str(raised.value) == (f"the saved state {final} has a damaged {piece} (10 bytes, not the {size:,} it was "
                                 f"saved with); {move_away_or_start_again(earlier)}")


def test_a_state_saved_before_complete_listed_its_files_still_needs_every_file_loading_reads(tmp_path,
                                                                                              cpu_accelerator, trained):
    store, earlier, final = two_states(tmp_path, cpu_accelerator)
    (final / COMPLETE).write_text("complete\n")  # what earlier versions wrote
    assert recorded_sizes(final) == {}
    (final / "data_manifest.json").unlink()  # older states kept no data record: not needed
    assert store.load(final)[0] == {"step": 2}
    (final / "random_states_0.pkl").unlink()
    with pytest.raises(UserError, match=rf"is missing random_states_0.pkl; move it away .*\({earlier}\)"):
        store.load(final)


def test_an_fp16_resume_of_a_state_saved_without_a_grad_scaler_says_to_resume_in_its_precision(
        tmp_path, cpu_accelerator, trained, monkeypatch):
    store, _, final = two_states(tmp_path, cpu_accelerator)
    monkeypatch.setattr(cpu_accelerator, "scaler", torch.amp.GradScaler("cpu"))  # as --mixed-precision fp16 has
    with pytest.raises(UserError, match=r"was saved without the grad scaler that --mixed-precision fp16 resumes; "
                                        r"resume it with the --mixed-precision it was saved with \(bf16 or no\)"):
        store.load(final)


def test_weights_of_another_model_say_so_rather_than_call_the_state_damaged(tmp_path, cpu_accelerator, trained):
    store, _, final = two_states(tmp_path, cpu_accelerator)
    cpu_accelerator._models[0] = torch.nn.Linear(4, 5)  # --model changed, and config.yaml gone that would refuse it
    with pytest.raises(UserError) as raised:
        store.load(final)
    assert str(raised.value) == (f"the saved state {final} holds the weights of a model other than the one this run "
                                 "builds (Error(s) in loading state_dict for Linear); resume with the --model it was "
                                 "saved with, or start a new run.")


def test_restore_gets_the_extras_and_extras_it_cannot_read_are_one_line(tmp_path, cpu_accelerator, trained):
    store, _, final = two_states(tmp_path, cpu_accelerator)
    restored = []
    assert store.load(final, restore=lambda mine, main: restored.append((mine, main)))[0] == {"step": 2}
    assert restored == [({"step": 2}, {"step": 2})]

    def another_version(mine: dict, main: dict) -> None:
        mine["generator"]  # a field this version reads, which the saving version did not write
    with pytest.raises(UserError) as raised:
        store.load(final, restore=another_version)
    assert str(raised.value) == (f"the saved state {final} holds what this run cannot read (KeyError: 'generator'): "
                                 "was it saved by another version of monkeytrain, or with other flags? Resume it as "
                                 "it was saved, or start a new run.")


def test_a_state_saved_by_more_processes_than_resume_it_says_how_many_to_resume_with(tmp_path, cpu_accelerator,
                                                                                     trained):
    store = StateStore(tmp_path, cpu_accelerator, keep=3)
    final = store.save(2, {"step": 2}, shared={})
    # as if saved by two processes: rank 0's file exists, but it says two processes wrote the state
    saved = torch.load(final / "progress-rank0.pt", weights_only=False)
    torch.save({**saved, "world_size": 2}, final / "progress-rank0.pt")
    with pytest.raises(UserError, match=r"was saved by 2 processes and this run has 1; resume it with 2 "
                                        r"\(accelerate launch --num_processes 2, or torchrun --nproc_per_node 2\)"):
        store.load(final)


def test_on_one_process_every_rank_agrees_on_the_main_process_state(cpu_accelerator, tmp_path):
    assert agree_on_state(tmp_path / "state" / "step-00000003") == tmp_path / "state" / "step-00000003"
    assert agree_on_state(None) is None



# --- a save that fails ------------------------------------------------------------------------------------------


def torch_save_failing(message: str):
    """torch.save as it fails a write: a part of the file written, then a RuntimeError in torch's own words."""
    def save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"written before the write failed")
        raise RuntimeError(message)
    return save


def failing(error: Exception):
    def fail(*args, **kwargs):
        raise error
    return fail


@pytest.mark.parametrize("where, error, reason", [
    ("torch.save", torch_save_failing("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
     "unexpected pos 704 vs 598"),
    ("torch.save", torch_save_failing("PytorchStreamWriter failed writing file data/0: file write failed"),
     "PytorchStreamWriter failed writing file data/0: file write failed"),
    ("save_state", failing(OSError(errno.EIO, "Input/output error")), "Input/output error"),
    ("save_state", failing(SafetensorError("Error while serializing: I/O error")),
     "Error while serializing: I/O error"),
], ids=["torch unexpected pos", "torch PytorchStreamWriter", "OSError EIO", "safetensors"])
def test_a_state_the_disk_fails_to_write_is_one_line_and_leaves_no_staging_folder(
        tmp_path, cpu_accelerator, trained, monkeypatch, where, error, reason):
    """A failing disk (EIO), which torch.save reports as a RuntimeError: a traceback before, and the half-written
    .tmp-step-* folder left until the next save."""
    store = StateStore(tmp_path, cpu_accelerator, keep=3)
    first = store.save(2, {"step": 2}, shared={})
    monkeypatch.setattr(*((torch, "save") if where == "torch.save" else (cpu_accelerator, "save_state")), error)
    with pytest.raises(WriteFailed) as raised:
        store.save(4, {"step": 4}, shared={})
    monkeypatch.undo()
    assert str(raised.value) == (f"cannot write step-00000004 in {tmp_path / 'state'} ({reason}); make that folder "
                                 "writable or pick another --output-dir.")
    assert names_in(tmp_path / "state") == [first.name]
    assert store.load(first)[0] == {"step": 2}


def test_a_bug_in_a_save_keeps_its_traceback_and_leaves_no_staging_folder(tmp_path, cpu_accelerator, trained):
    """Extras that cannot be pickled are monkeytrain's error, not the disk's."""
    store = StateStore(tmp_path, cpu_accelerator, keep=3)
    with pytest.raises(AttributeError, match="Can't pickle local object"):
        store.save(4, {"not a value": lambda: None}, shared={})
    assert names_in(tmp_path / "state") == []


@pytest.mark.parametrize("code, words", [(errno.EDQUOT, "your disk quota is used up"),
                                         (errno.ENOSPC, "no space left")])
def test_a_state_save_out_of_quota_says_quota_and_out_of_space_says_no_space(tmp_path, cpu_accelerator, trained,
                                                                          monkeypatch, code, words):
    """On a cluster `df` shows terabytes free: "no space left" would send the user looking for the wrong thing."""
    store = StateStore(tmp_path, cpu_accelerator, keep=3)
    first = store.save(2, {"step": 2}, shared={})
    monkeypatch.setattr(cpu_accelerator, "save_state", failing(OSError(code, os.strerror(code))))
    with pytest.raises(DiskFull) as raised:
        store.save(4, {"step": 4}, shared={})
    assert str(raised.value).startswith(f"{words} on the device of {tmp_path / 'state'} to write step-00000004 "
                                        f"(at least {human_size(folder_size(first))} needed)")
    assert names_in(tmp_path / "state") == [first.name]


def test_a_torch_save_over_quota_is_told_a_quota_by_the_folder(tmp_path, cpu_accelerator, trained, monkeypatch):
    """torch.save says only "unexpected pos": a small write into the folder tells a quota from a full device."""
    store = StateStore(tmp_path, cpu_accelerator, keep=3)
    store.save(2, {"step": 2}, shared={})

    def quota_full(path, write, durable):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    monkeypatch.setattr(torch, "save", torch_save_failing("[enforce fail at inline_container.cc:672] . unexpected pos"))
    monkeypatch.setattr(storage, "_write_file", quota_full)
    with pytest.raises(DiskFull, match=f"^your disk quota is used up on the device of {tmp_path / 'state'} to write "
                                       "step-00000004"):
        store.save(4, {"step": 4}, shared={})


def test_a_state_saved_after_the_run_folder_was_deleted_stops_and_makes_no_folder_of_its_name(
        tmp_path, cpu_accelerator, trained):
    """A stop (SIGTERM) saves a state before the next metrics line would find the run folder gone; making it
    again would leave a folder of the run's name holding a state and nothing else, for --resume auto to take."""
    run_dir = tmp_path / "runs" / "gone"
    run_dir.mkdir(parents=True)
    store = StateStore(run_dir, cpu_accelerator, keep=3)
    store.save(2, {"step": 2}, shared={})
    shutil.rmtree(run_dir)
    with pytest.raises(UserError) as raised:
        store.save(4, {"step": 4}, shared={})
    assert str(raised.value) == (f"the run folder {run_dir} was deleted or moved away while the run trained, and "
                                 "with it the run's records; stopped rather than write an incomplete run there: "
                                 "start a new run.")
    assert names_in(tmp_path / "runs") == []


def complete_state(run_dir: Path, step: int) -> Path:
    """A state folder as --resume's choice sees it: marked complete (its files are the loader's business)."""
    folder = run_dir / "state" / f"{STATE_PREFIX}{step:08d}"
    folder.mkdir(parents=True)
    (folder / COMPLETE).write_text(json.dumps({"files": {}}))
    return folder


def test_a_run_folder_or_its_state_folder_resumes_from_its_newest_complete_state(tmp_path):
    run = tmp_path / "runs" / "cut"
    complete_state(run, 11)
    newest = complete_state(run, 22)
    incomplete_state(run, 33)  # never marked complete: --resume auto passes it over too
    for given in (run, run / "state", f"{run}/"):
        assert resolve_resume(str(given), tmp_path / "elsewhere") == newest
    assert resumed_state(str(run)) == str(newest)
    assert [resumed_state(flag) for flag in (None, "auto", str(newest))] == [None, "auto", str(newest)]


def test_a_run_folder_without_a_complete_state_says_how_to_start_it_over(tmp_path):
    run = tmp_path / "runs" / "early"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("epochs: 3\n")
    incomplete_state(run, 5)
    with pytest.raises(UserError) as raised:
        resolve_resume(str(run), run)
    assert str(raised.value) == (f"{run} has no complete saved state to resume (stopped before its first save?); "
                                 f"start it over with --resume auto --output-dir {run.parent} --run-name early, or "
                                 "start a new run.")


def test_a_best_checkpoint_given_to_resume_says_to_start_a_new_run_from_it(tmp_path):
    best = tmp_path / "runs" / "done" / "best.safetensors"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"weights")
    with pytest.raises(UserError, match=f"^{best} holds weights alone, not a saved training state; to train from "
                                        f"them, start a new run with --pretrained {best}; "):
        resolve_resume(str(best), best.parent)


def test_a_run_resumed_by_its_folder_continues_in_it(tmp_path, make_image_folder):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=6)
    flags = ["--data", str(data), "--cpu", "--model", "test_resnet", "--image-size", "32", "--batch-size", "4",
             "--epochs", "2", "--num-workers", "0", "--report-to", "none", "--cpu-threads", "1"]
    with interrupted("term", 3):
        train_here([*flags, "--run-name", "cut"], tmp_path)
    run = tmp_path / "runs" / "cut"
    assert state_dirs(run) and not (run / "results.json").exists()
    resumed = train_here([*flags, "--resume", "runs/cut"], tmp_path)
    assert resumed.results["best_epoch"] >= 1 and (run / "results.json").is_file()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["cut"]  # no new run beside it
