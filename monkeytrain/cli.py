"""The `monkeytrain` command: train, tune, predict, evaluate, export, inspect-data, download, cache."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import time
import unicodedata
from dataclasses import replace
from pathlib import Path

from monkeytrain import __version__
from monkeytrain.data.layout import DEFAULT_DATA_ROOT
from monkeytrain.errors import USAGE_EXIT_CODE, FlagParser, UserError, exits_cleanly_on_user_error, to_stderr


CHECKPOINT_HELP = "a run's best.safetensors, or its .onnx from monkeytrain export"
MAX_LISTED_CLASSES = 20  # inspect-data lists each class's image count up to this many classes
MIN_NAME_COLUMN = 28  # evaluate's class names column, wider where a name is (the longest monkey name is 25)


def given(text: str) -> str:
    """The argparse type of a path: "" (what `"$UNSET"` passes) would be the current folder, so it is refused."""
    if not text:
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?); give a path")
    return text


def given_path(text: str) -> Path:
    return Path(given(text))


class CommandParser(FlagParser):
    """FlagParser whose error for a mistyped command names the command meant, as it does for a flag: argparse
    lists every command (Python 3.14's suggest_on_error would add the hint; 3.10 to 3.13 have none)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commands = {}  # name -> its parser, filled by build_parser

    def error(self, message: str):
        typed = re.match(r"(argument COMMAND: invalid choice: '(.*?)')", message)
        meant = difflib.get_close_matches(typed[2], list(self.commands), n=1) if typed else []
        super().error(f"{typed[1]} (did you mean {meant[0]}?)" if meant else message)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="monkeytrain", description=__doc__)
    parser.add_argument("--version", action="version", version=f"monkeytrain {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = commands.choices

    commands.add_parser("train", help="train (same flags as monkeytrain/train.py; --help there)",
                        add_help=False)
    commands.add_parser("tune", help="search hyper-parameters with Optuna (monkeytrain tune --help)",
                        add_help=False)

    predict = commands.add_parser("predict", help="top-k species for images, from a checkpoint alone")
    predict.add_argument("inputs", nargs="+", type=given, metavar="IMAGE_OR_DIR",
                         help="image files, folders whose images (subfolders too) are predicted, or - for "
                              "an image piped to standard input")
    predict.add_argument("--checkpoint", required=True, type=given_path, help=CHECKPOINT_HELP)
    predict.add_argument("--top-k", type=int, default=3, help="how many classes to show (default: 3)")
    predict.add_argument("--json", action="store_true", help="print one JSON document")
    predict.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")

    score = commands.add_parser("evaluate", help="score a checkpoint on a folder of class subfolders")
    score.add_argument("folder", type=given_path, help="a folder of class subfolders named as in training or by "
                                                 "class name, e.g. data/10-monkey-species/validation/validation")
    score.add_argument("--checkpoint", required=True, type=given_path, help=CHECKPOINT_HELP)
    score.add_argument("--json", action="store_true", help="print one JSON document")
    score.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    score.add_argument("--allow-training-images", action="store_true",
                       help="score the folder the checkpoint's run trained on anyway (refused by default: most of "
                            "its images trained the model), a figure of how well it fits them, not a test figure")

    export = commands.add_parser("export", help="an ONNX model of a checkpoint, checked in ONNX Runtime")
    export.add_argument("--checkpoint", required=True, type=given_path, help="a run's best.safetensors")
    export.add_argument("--output", type=given_path, help="the .onnx file to write (default: beside the checkpoint)")
    export.add_argument("--check-data", type=given_path, metavar="FOLDER",
                        help="check on this folder of class subfolders, e.g. the test split "
                             "(default: 16 seeded synthetic images)")
    export.add_argument("--tolerance", type=float, default=1e-3,
                        help="the largest logit difference allowed between ONNX Runtime and PyTorch, relative "
                             "to the image's largest logit where that exceeds 1 (default: 1e-3)")
    export.add_argument("--opset", type=int, metavar="VERSION",
                        help="the ONNX operator set to write, 18 or newer, e.g. 18 for an older ONNX Runtime "
                             "that refuses the default (default: torch's exporter's own; the last line says which)")

    inspect = commands.add_parser("inspect-data", help="show what a dataset holds and what training would use")
    inspect.add_argument("data", nargs="?", help="dataset root (default: as for training)")
    inspect.add_argument("--data", dest="data_flag", metavar="DATA", help="the same, as train.py spells it")
    for field in ("train_dir", "val_dir", "test_dir"):
        inspect.add_argument(f"--{field.replace('_', '-')}", **as_in_training(field))
    inspect.add_argument("--val-fraction", type=float, **as_in_training("val_fraction"))
    inspect.add_argument("--test-fraction", type=float, **as_in_training("test_fraction"))
    inspect.add_argument("--seed", type=int, **as_in_training("seed"))
    inspect.add_argument("--json", action="store_true", help="print the full data manifest")

    download = commands.add_parser("download", help="fetch 10 Monkey Species from Kaggle (kagglehub)")
    download.add_argument("--dest", type=given_path, default=DEFAULT_DATA_ROOT, metavar="FOLDER",
                          help=f"an empty or new folder to put the data set in (default: {DEFAULT_DATA_ROOT}, "
                               "where training looks for it)")

    cache = commands.add_parser("cache", help="what the cache folder holds (stored views, statistics, ...); "
                                              "--clear deletes it")
    cache.add_argument("--cache-dir", help="the cache folder (default: as for training, "
                                           "$MONKEYTRAIN_CACHE, else ~/.cache/monkeytrain)")
    cache.add_argument("--unused-days", type=float, metavar="DAYS",
                       help="only what no run has used for DAYS days (default: everything)")
    cache.add_argument("--clear", action="store_true",
                       help="delete it; runs make again what they need (do not clear during a run)")
    for command in (predict, score, export, inspect, download, cache):
        command.set_defaults(parser=command)  # its own errors name its own flags (FlagParser.parse_args)
    return parser


def as_in_training(field: str) -> dict:
    """A train.py flag's default and help, for a subcommand that takes the same flag."""
    from monkeytrain.config import FIELDS

    default = FIELDS[field].default
    shown = "as in training" if default is None else f"default: {default}, as in training"
    return {"default": default, "help": f"{FIELDS[field].metadata['help']} ({shown})"}


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> None:
    try:
        run_command(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # a reader that has gone shows here, not in Python's own flush at exit
    except BrokenPipeError:
        # `monkeytrain predict ... | head`: the reader has all it wanted. End quietly with status 1, as
        # Python's documentation advises, stdout on /dev/null so that the flush at exit cannot raise too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def run_command(argv: list[str]) -> None:
    if argv[:1] == ["train"]:
        from monkeytrain.train import main as train_main

        status = train_main(argv[1:]).get("exit_status", 0)  # a stopped run is not a finished one
        if status:
            sys.exit(status)
        return
    if argv[:1] == ["tune"]:
        from monkeytrain.tune import main as tune_main

        status = tune_main(argv[1:])
        if status:
            sys.exit(status)
        return
    args = build_parser().parse_args(argv)
    {"predict": run_predict, "evaluate": run_evaluate, "export": run_export,
     "inspect-data": run_inspect, "download": run_download, "cache": run_cache}[args.command](args)


def device_for(cpu_only: bool) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and not cpu_only else "cpu"


def warn_about_files(skipped: list, images: list = ()) -> None:
    from monkeytrain.data.imagefiles import oversized_warning
    from monkeytrain.predict import shown_path

    for bad in skipped:
        to_stderr("warning", f"skipping {bad.path}: {bad.reason}.")
    for large in (image for image in images if image.oversized):
        to_stderr("warning", oversized_warning(replace(large, path=shown_path(large))))  # `-`, if piped in


def run_predict(args: argparse.Namespace) -> None:
    from monkeytrain.data.imagefiles import ImageFile
    from monkeytrain.predict import collect_images, load_classifier, predict, scratch_for

    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1 (got {args.top_k}); it is how many classes to show.")
    device = device_for(args.cpu)
    classifier = load_classifier(args.checkpoint, device)  # a wrong checkpoint is told before images are read
    unreadable = []  # the named files that held no image, each told in its turn
    with scratch_for(args.inputs) as scratch:  # where an image piped in (-) is kept while it is predicted
        given, skipped = collect_images(args.inputs, scratch)
        warn_about_files(skipped, [item for item in given if isinstance(item, ImageFile)])
        results = predict(classifier, given, args.top_k, device)
        print_predictions(answers_telling_the_unreadable(results, unreadable), args.json)
    if unreadable:  # after every answer (none is lost), so that a script sees that not every file was answered
        sys.exit(USAGE_EXIT_CODE)


def answers_telling_the_unreadable(results, unreadable: list):
    """The predictions among predict's `results`; each named file that is no image is told on stderr in its turn
    and kept in `unreadable`. Not in --json's array: its elements stay all alike (`jq '.[].top[0]'` meets no
    other kind), as for files skipped in a folder, and the exit status tells a script that one failed."""
    from monkeytrain.predict import Unreadable

    for result in results:
        if isinstance(result, Unreadable):
            to_stderr("error", result.message)
            unreadable.append(result)
        else:
            yield result


def print_predictions(predictions, as_json: bool) -> None:
    """Each answer as it comes: one line, or one element of a JSON array."""
    if as_json:
        print_json_array({"path": str(p.path), "top": [{"class": c, "probability": q} for c, q in p.top]}
                         for p in predictions)
        return
    for p in predictions:
        print(f"{p.path}: " + ", ".join(f"{c} {q:.1%}" for c, q in p.top), flush=True)


def print_json_array(items) -> None:
    """One JSON document, an array, written one element a line as each comes (for a long list: the
    first answers at once, and `grep` works on it too); an element waits for the next, for its comma."""
    print("[")
    previous, stopped = None, None
    try:
        for item in items:
            if previous is not None:
                print(f"  {previous},", flush=True)
            previous = json.dumps(item)
    except UserError as error:  # predict's `none of the files given is an image`: told on stderr, after the array
        stopped = error
    if previous is not None:
        print(f"  {previous}")
    print("]")  # so that stdout is always one JSON document
    if stopped is not None:
        raise stopped


def run_evaluate(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    from monkeytrain.predict import evaluate_folder, shown_class_names
    from monkeytrain.results import accuracy_interval, balanced_accuracy, interval_words, json_with_matrix_rows

    accelerator = Accelerator(cpu=args.cpu)
    result, info, skipped, trained = evaluate_folder(args.checkpoint, args.folder, accelerator,
                                                     allow_training_images=args.allow_training_images)
    warn_about_files(skipped)
    if trained:
        to_stderr("warning", trained.warning())
    names = shown_class_names(info)
    accuracies, counts = result.per_class_accuracy(), result.confusion.sum(dim=1).tolist()
    balanced, interval = balanced_accuracy(accuracies), accuracy_interval(result)  # as results.json's
    if args.json:  # the matrix's rows are the true classes, its columns the predicted, both in class_names order
        print(json_with_matrix_rows({
            "accuracy": result.accuracy, "accuracy_ci95": interval, "balanced_accuracy": balanced,
            "loss": result.loss, "images": result.count,
            **({"training_images": trained.count} if trained else {}),  # null: most, uncounted
            "per_class_accuracy": dict(zip(names, accuracies)), "per_class_images": dict(zip(names, counts)),
            "class_names": names, "confusion_matrix": result.confusion.tolist()}))
        return
    print(f"accuracy {result.accuracy:.2%} ({interval_words(interval)}) on {result.count} images "
          f"(loss {result.loss:.4f}), balanced accuracy {balanced:.2%}{not_a_test_figure(trained)}")
    for line in per_class_lines(names, accuracies, counts):
        print(line)


def not_a_test_figure(trained) -> str:
    """What evaluate's accuracy line adds where the images include those the checkpoint trained on."""
    if not trained:
        return ""
    which = "most of these images" if trained.count is None else f"{trained.count} of these {trained.total} images"
    return f"; not a test figure: {which} trained the checkpoint"


def per_class_lines(names: list[str], accuracies: list, counts: list[int]) -> list[str]:
    """evaluate's table: each class's name, padded to the widest as a terminal shows it, then its accuracy."""
    width = max([MIN_NAME_COLUMN, *map(display_width, names)])
    return [f"  {padded(name, width)} {'n/a (no images)' if accuracy is None else f'{accuracy:6.1%} of {count}'}"
            for name, accuracy, count in zip(names, accuracies, counts)]


def display_width(text: str) -> int:
    """The columns a terminal gives `text`: wide and fullwidth characters (CJK: 猫, ニホンザル) take two,
    combining marks none; len() counts each as one, so a table of Chinese or Japanese class names went askew."""
    return sum(0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1
               for char in text)


def padded(text: str, width: int) -> str:
    return text + " " * max(0, width - display_width(text))


def run_export(args: argparse.Namespace) -> None:
    from monkeytrain.export import export_checkpoint
    from monkeytrain.storage import human_size

    done = export_checkpoint(args.checkpoint, args.output, args.check_data, args.tolerance, args.opset)
    warn_about_files(done.skipped)
    agreement, size = done.agreement, done.info.image_size
    print(f"checked in ONNX Runtime against PyTorch on {done.checked_on}: largest logit difference "
          f"{agreement.largest_difference:.1e} (relative {agreement.relative_difference:.1e}, "
          f"tolerance {args.tolerance:g}), top-1 agreement {agreement.top1_agreement:.1%}")
    print(f"wrote {done.path} ({human_size(done.size)}, ONNX opset {done.opset}): input float32 "
          f"[batch, 3, {size}, {size}] normalised as its metadata says, output logits [batch, {done.info.num_classes}]")


def run_inspect(args: argparse.Namespace) -> None:
    from monkeytrain.cachefolder import cache_folder
    from monkeytrain.data.dataset import discover_splits, why_no_held_out_image

    config = inspected_config(args)
    root, folders = inspected_folders(config)
    splits = discover_splits(folders, config.val_fraction, config.seed, strict=False,
                             test_fraction=config.test_fraction, cache_dir=cache_folder(config.cache_dir))
    manifest = splits.manifest()
    if args.json:
        print(json.dumps(manifest, indent=2))
        return
    print(f"{root or folders.train}: layout {manifest['layout']}, {len(splits.class_names)} classes")
    for split, files in splits.named_splits().items():
        per_class = list(manifest["per_class_counts"][split].values())
        print(f"  {split:<5} {len(files):>5} images  per class {class_counts(per_class)}")
    for split, origin in split_origins(folders, splits.selection_on_test, config, root).items():
        print(f"  {split:<5} {origin}")
    for split in splits.named_splits():  # the counts above do not say which, past MAX_LISTED_CLASSES
        missing = splits.classes_missing_from(split)
        if missing:  # with the reason training's warning gives
            print(f"  {split:<5} has no image of {len(missing)} class(es): {', '.join(map(shown_folder, missing))} "
                  f"({why_no_held_out_image(splits, missing)})")
    for line in class_lines(splits.class_folders, splits.class_names):
        print(line)
    for bad in splits.skipped:
        print(f"  skipped {bad.path}: {bad.reason}")
    for a, b in splits.leaks:
        print(f"  leak: {a} = {b}")
    folders_of = [shown_folder(folder) for folder in splits.class_folders]
    for a, b in splits.conflicts:
        print(f"  two classes ({folders_of[a.label]}, {folders_of[b.label]}): {a.path} = {b.path}")
    for note in data_notes(splits):
        print(f"  note: {note}")


def data_notes(splits) -> list[str]:
    """What training warns about the images it will use, beside the problems listed above."""
    from monkeytrain.data.dataset import elongated_warning
    from monkeytrain.data.imagefiles import oversized_warning

    # found as training's report_data_problems finds them, so that each note here is a warning there
    notes = [oversized_warning(f) for files in splits.distinct_splits().values() for f in files if f.oversized]
    notes.append(elongated_warning(splits))
    if splits.selection_on_test:
        notes.append("--val-fraction 0 selects on the test split (selection-biased test figure)")
    return [note for note in notes if note]


def inspected_config(args: argparse.Namespace):
    """The training config of the flags inspect-data shares with train.py, checked as train.py checks them."""
    from monkeytrain.config import TrainConfig, check_data_flags

    if None not in (args.data, args.data_flag) and args.data != args.data_flag:
        raise UserError(f"two dataset roots given ({args.data} and --data {args.data_flag}); give one.")
    config = TrainConfig(data=args.data if args.data is not None else args.data_flag,
                         train_dir=args.train_dir, val_dir=args.val_dir, test_dir=args.test_dir,
                         val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    check_data_flags(config)
    return config


def inspected_folders(config) -> tuple:
    """(the dataset root or None for split folders given one by one, the split folders), as training finds them."""
    from monkeytrain.cachefolder import cache_folder
    from monkeytrain.data.dataset import explicit_dirs, find_split_folders, user_data_root
    from monkeytrain.data.synthetic import ensure_synthetic_dataset, names_synthetic_set

    root = user_data_root(config)
    if names_synthetic_set(config.data):  # as a run's config.yaml names it
        root = ensure_synthetic_dataset(cache_folder(config.cache_dir))
    if root is None and not explicit_dirs(config):
        raise UserError(f"no dataset given and none at {DEFAULT_DATA_ROOT}; pass a dataset root.")
    return root, find_split_folders(config, root)


def split_origins(folders, selection_on_test: bool, config, root) -> dict[str, str]:
    """Where each split's images come from, one phrase each: a folder, or held out of one."""
    def shown(folder) -> str:  # below the root, which the first line names, relative to it
        inside = root and folder != root and folder.is_relative_to(root)
        return str(folder.relative_to(root)) if inside else str(folder)

    train, held_out = shown(folders.train), []
    origins = {}
    if folders.test is None:
        origins["test"] = f"held out of {train} (--test-fraction {config.test_fraction:g}, the same for every seed)"
        held_out.append("test")
    else:
        origins["test"] = f"from {shown(folders.test)}"
    if folders.selection is not None:
        origins["val"] = f"from {shown(folders.selection)}"
    elif selection_on_test:
        origins["val"] = "is the test split (--val-fraction 0)"
    else:
        origins["val"] = f"held out of {train} (--val-fraction {config.val_fraction:g}, --seed {config.seed})"
        held_out.insert(0, "val")
    less = f", less the {' and '.join(held_out)} held out of it" if held_out else ""
    return {"train": f"from {train}{less}", **{name: origins[name] for name in ("val", "test")}}


def class_lines(folders: list[str], names: list[str]) -> list[str]:
    """One line per class in label order, its index first: folders sort as strings (10 before 2), as in
    torchvision's ImageFolder. The display name follows where it is not the folder's own."""
    width = len(str(len(folders) - 1))
    return ["  classes by label (folder: name where it differs):"] + [
        f"  {index:>{width}}. {shown_folder(folder)}" + (f": {name}" if name != folder else "")
        for index, (folder, name) in enumerate(zip(folders, names))]


def shown_folder(folder: str) -> str:
    """A class folder's name with its bytes that are not UTF-8 (a zip made on Windows) as escapes, b\\xe9bird:
    printed as they are, a UTF-8 terminal shows each as �, so the folder looked the same as its display name
    (b�bird: b�bird), and a strict console printed Python's \\udce9."""
    return folder.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def class_counts(per_class: list[int]) -> str:
    """Every class's count, or for more classes than a line holds, their range and median."""
    if len(per_class) <= MAX_LISTED_CLASSES:
        return str(per_class)
    ordered = sorted(per_class)
    return f"{ordered[0]} to {ordered[-1]}, median {ordered[len(ordered) // 2]}"


def run_download(args: argparse.Namespace) -> None:
    from monkeytrain.data.download import download_monkey_species, holds_monkey_species

    if holds_monkey_species(args.dest):  # not a folder in the way, to remove: what the command would make
        print(f"{args.dest} already holds 10 Monkey Species in Kaggle's layout (classes n0 to n9); nothing to do.")
        return
    print(f"downloaded to {download_monkey_species(args.dest)}")


def run_cache(args: argparse.Namespace) -> None:
    from monkeytrain.cachefolder import KINDS, cache_entries, delete_entries, listed_cache_folder, unused_for
    from monkeytrain.storage import human_size

    folder = listed_cache_folder(args.cache_dir)
    entries = cache_entries(folder)
    missing = "" if folder.exists() else "; the folder does not exist yet (no run has cached anything in it)"
    which = "everything"
    if args.unused_days is not None:
        days = f"{args.unused_days:g} day{'' if args.unused_days == 1 else 's'}"
        entries, which = unused_for(entries, args.unused_days), f"unused for {days}"
    total = human_size(sum(entry.size for entry in entries))
    if args.clear:
        delete_entries(entries)
        print(f"{folder}: deleted {counted(entries)} ({which}), {total}{missing}")
        return
    print(f"{folder}: {counted(entries)} ({which}), {total}{missing}")
    for kind in KINDS:
        of_kind = [entry for entry in entries if entry.kind == kind]  # oldest use first
        if of_kind:
            size = human_size(sum(entry.size for entry in of_kind))
            last = time.strftime("%Y-%m-%d %H:%M", time.localtime(of_kind[-1].last_used))
            print(f"  {kind:<11} {len(of_kind):>5}  {size:>10}  last used {last}")


def counted(entries: list) -> str:
    return f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"


if __name__ == "__main__":
    main()
