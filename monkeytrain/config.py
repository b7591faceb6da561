"""The one training config: a dataclass whose fields document themselves.

Values resolve in this order, later winning: field defaults (the GPU recipe),
the recipe of the device the run trains on (`--recipe`), the `--debug`
preset, a `--config FILE.yaml` preset, then command-line flags. Unknown keys
are an error. The resolved config, with the recipe that applied, is saved in
the run directory and in the checkpoint metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from monkeytrain import __version__
from monkeytrain.errors import FlagParser, UserError, nearest_choice, to_stderr

# The one list of accepted values of each choice flag: argparse, YAML presets and
# validation all read them from the field's metadata.
PIPELINE_CHOICES = ("auto", "resident", "stream")
RECIPE_CHOICES = ("auto", "gpu", "cpu")
REPORT_TO_CHOICES = ("auto", "wandb", "none")
PRECISION_CHOICES = ("no", "fp16", "bf16")
OPTIMIZER_CHOICES = ("sgd", "adamw")
SELECT_ON_CHOICES = ("balanced-accuracy", "accuracy")  # selection.BALANCED, selection.PLAIN
MIN_IMAGE_SIZE = 16  # the smallest --image-size and --min-train-size
MAX_EPOCHS = 1_000_000  # a bound far above any real run: start-up walks the epochs (progressive resizing)
# Old names that still work, with one warning line: flags (field names) and values.
RENAMED_FIELDS = {"max_steps_per_epoch": "max_batches_per_epoch"}
RENAMED_VALUES = {("data_pipeline", "gpu"): "resident"}


def _option(default: Any, help: str, **argparse_extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **argparse_extra})


@dataclass
class TrainConfig:
    # --- data ---
    data: Optional[str] = _option(
        None,
        "Dataset root (Kaggle layout, flattened, train/ or training/ with val/, valid/, validation/ and/or "
        "test/, testing/, or one folder of class subfolders). Default: "
        "$MONKEYTRAIN_DATA, else data/10-monkey-species, else a generated synthetic set.",
    )
    train_dir: Optional[str] = _option(None, "Explicit training folder of class subfolders.")
    val_dir: Optional[str] = _option(
        None, "Explicit validation folder of class subfolders: with --test-dir it chooses the best epoch; without, "
        "it is scored as the test split (as Kaggle's validation/) and the best epoch is chosen on --val-fraction "
        "of the --train-dir images.")
    test_dir: Optional[str] = _option(None, "Explicit test folder of class subfolders.")
    val_fraction: float = _option(
        0.1,
        "Fraction of training images held out (stratified, seeded) to pick the best "
        "epoch when the data has no separate test split; 0 selects on the test split.",
    )
    test_fraction: float = _option(
        0.2,
        "Fraction of images held out (stratified, the same for every --seed) as the test split when "
        "the dataset is one folder of class subfolders, with no split on disk.",
    )
    strict_data: bool = _option(False, "Fail on a corrupt or non-image file instead of skipping it.")
    image_size: int = _option(224, "Side of the square training and evaluation crops, in pixels.")
    num_workers: Optional[int] = _option(
        None, "DataLoader worker processes per rank. Default: the CPU cores this process may use (in a "
        "Slurm job, at most those Slurm gave it), shared among the processes of the run, at most 8.")
    cache_dir: Optional[str] = _option(
        None, "Cache folder for what runs can make again: stored views (decoded images), scans of the "
        "split folders, channel statistics, the synthetic set and torch.compile kernels (monkeytrain cache "
        "lists and clears it). Default: $MONKEYTRAIN_CACHE, else ~/.cache/monkeytrain."
    )
    data_pipeline: str = _option(
        "auto", "resident: decode once and keep the data in the training device's memory (GPU or "
        "host), augmenting there; stream: DataLoader workers decode every epoch; auto: resident "
        "when the data fits comfortably in free memory. (gpu is the old name of resident.)",
        choices=PIPELINE_CHOICES,
    )
    # --- augmentation ---
    min_crop_scale: float = _option(0.35, "Smallest area fraction kept by the random resized crop.")
    rotation: float = _option(15.0, "Largest random rotation, in degrees either way.")
    color_jitter: float = _option(0.3, "Strength of random brightness, contrast and saturation changes.")
    hflip: float = _option(
        0.5, "Horizontal flip (timm's --hflip): the chance that a training image is mirrored left to right (per "
        "sample, on the device); 0 never mirrors, for data whose left and right differ (digits, text, arrows), "
        "and then evaluation leaves out the mirror image too unless --tta-flip is given.")
    mixup_alpha: float = _option(
        0.0, "MixUp: blend each training image with another by a ratio drawn from Beta(alpha, alpha), "
        "and their labels alike (per sample, on the device); 0 disables.")
    cutmix_alpha: float = _option(
        0.0, "CutMix: paste a box of another training image, of an area drawn from Beta(alpha, alpha), "
        "and weigh the labels by area; 0 disables.")
    mix_prob: float = _option(1.0, "With MixUp or CutMix: the chance that a training image is mixed.")
    mix_switch_prob: float = _option(
        0.5, "With both MixUp and CutMix: the chance that a mixed image uses CutMix rather than MixUp.")
    random_erasing: float = _option(
        0.0, "Random erasing (timm's --reprob, --remode pixel): the chance that a training image gets one "
        "rectangle (0.02 to 1/3 of its area, height/width 0.3 to 3.3) filled with normal noise (per sample, on "
        "the device); 0 disables.")
    min_train_size: int = _option(
        0, "Progressive resizing: train the first epochs on crops this many pixels square, growing in "
        "steps of 16 to --image-size (which evaluation always uses); 0 trains at --image-size throughout.")
    full_size_fraction: float = _option(
        0.25, "With --min-train-size: the last fraction of the epochs that train at --image-size.")
    # --- model ---
    model: str = _option("resnet18", "Any timm model name (resnet18, resnet50, ...).")
    pretrained: Optional[str] = _option(
        None,
        "Start from pretrained weights: bare flag for timm hub weights, or a local "
        ".safetensors file (a monkeytrain checkpoint too). Default: from scratch.",
        nargs="?", const="hub",
    )
    drop_rate: float = _option(
        0.0, "Dropout before the classifier: timm's drop_rate (its train.py's --drop); 0 disables.")
    drop_path_rate: float = _option(
        0.0, "Stochastic depth: the chance that the last residual block is skipped, less for earlier ones, in "
        "training (timm's drop_path_rate, its train.py's --drop-path; for ViT, Swin or ConvNeXt from scratch, "
        "say 0.1); 0 disables.")
    # --- optimisation ---
    # The field defaults are the GPU recipe: from scratch on the monkey set, chosen
    # on the held-out validation split (benchmarks/RESULTS.md): many short epochs
    # on the GPU-resident data, an EMA of the weights and flip test-time
    # augmentation. CPU runs start from CPU_RECIPE instead (see --recipe).
    recipe: str = _option(
        "auto", "Defaults to start from: gpu (224 px, 150 epochs), cpu (small images, minutes on a "
        "laptop), or auto: the recipe of the device the run trains on. Flags and --config override it.",
        choices=RECIPE_CHOICES,
    )
    epochs: int = _option(150, "Number of training epochs.")
    batch_size: int = _option(64, "Images per batch on each process.")
    optimizer: str = _option("sgd", "sgd (with momentum) or adamw.", choices=OPTIMIZER_CHOICES)
    lr: float = _option(0.1, "Peak learning rate, reached after warmup.")
    momentum: float = _option(0.9, "SGD momentum (AdamW beta1).")
    weight_decay: float = _option(5e-4, "Weight decay, not applied to norm and bias parameters.")
    warmup_epochs: float = _option(2.0, "Linear warmup length before the cosine decay, in epochs.")
    label_smoothing: float = _option(0.1, "Label smoothing of the cross-entropy loss.")
    grad_accum_steps: int = _option(1, "Batches whose gradients are summed before each optimizer step.")
    clip_grad_norm: float = _option(0.0, "Clip the gradient norm to this value; 0 disables clipping.")
    mixed_precision: Optional[str] = _option(
        None, "Autocast precision: no, fp16 or bf16. Default: what `accelerate launch` was "
        "configured with, else bf16 on a GPU and no on the CPU; fp16 instead of bf16 on a GPU older "
        "than Ampere (T4, V100, P100), which only emulates bf16.", choices=PRECISION_CHOICES,
    )
    seed: int = _option(0, "Seed for weights, data order, splits and augmentation.")
    max_batches_per_epoch: int = _option(
        0, "Stop each epoch after this many batches (an optimizer step is every --grad-accum-steps "
        "batches); 0 runs all.")
    compile: bool = _option(False, "torch.compile the model (kernels cached in --cache-dir for later runs).")
    cuda_graphs: bool = _option(
        False, "Replay each training step from a CUDA graph (one launch per batch), where it applies: CUDA "
        "processes (DDP included) on resident data, without fp16. Not yet measured on a GPU.")
    ema_decay: float = _option(
        0.998, "Evaluate and save an EMA of the weights; its decay per optimizer step warms up to "
        "this value (1 - (1 + step)^-0.75, as timm's ModelEmaV3 does); 0 disables.")
    tta_flip: bool = _option(
        True, "Evaluate on each image and its mirror image, averaging the logits (off unless given with --hflip 0).")
    tta_shift: int = _option(
        0, "Also evaluate on crops this many pixels left, right, up and down of the centre crop (from the "
        "stored view's margin), averaging the logits; 0: the centre crop only.")
    select_on: str = _option(
        "balanced-accuracy", "What chooses the best epoch (best.safetensors) on the held-out images: "
        "balanced-accuracy, the mean of the per-class accuracies, which a model that answers the largest "
        "class does not win; or accuracy. Ties go to the lower validation loss.", choices=SELECT_ON_CHOICES,
    )
    # --- resume ---
    resume: Optional[str] = _option(
        None, "auto: continue from the newest complete saved state of this run (start fresh if none); "
        "or a RUN/state/step-* folder.")
    save_every: int = _option(0, "Also save the full training state every this many optimizer steps; 0: "
                                 "only on the time schedule and on a stop signal.")
    save_every_minutes: float = _option(
        10.0, "Save the full training state every this many minutes of wall time (checked after every "
        "optimizer step on the CPU, every 8th on a GPU, and at each epoch end), so a crash or SIGKILL "
        "loses at most that; 0 disables.")
    keep_states: int = _option(2, "How many saved training states to keep.")
    # --- tracking ---
    report_to: str = _option(
        "auto", "wandb, none, or auto (wandb when it is installed and configured: WANDB_API_KEY, a "
        "`wandb login` in ~/.netrc, or WANDB_MODE=offline).", choices=REPORT_TO_CHOICES)
    log_checkpoint: bool = _option(False, "Upload the best checkpoint to W&B as an artifact.")
    # --- run ---
    output_dir: str = _option("runs", "Folder that holds one directory per run.")
    run_name: Optional[str] = _option(None, "Run directory name. Default: a timestamp.")
    cpu: bool = _option(False, "Train on the CPU even when a GPU is present.")
    cpu_threads: Optional[int] = _option(
        None, "Threads a CPU run trains with (this replaces OMP_NUM_THREADS, which accelerate launch "
        "without a config sets to 1). Default: the cores this process may use (in a Slurm job, at most "
        "those Slurm gave it), shared among the run's processes.")
    debug: bool = _option(False, "Quick check: CPU, small images, a few batches, two epochs.")
    score_test: bool = _option(
        True, "At the end, reload the best checkpoint and score it on the test split. monkeytrain tune "
        "turns this off for its trials, so that a search never sees the test split.")

    # Not a field (no annotation), so neither a flag nor recorded: the fields the user gave, by flag or --config
    # preset, with their values as given (parse_config sets it). A default cannot be told from the same value
    # given: the launcher's gradient accumulation replaces a default --grad-accum-steps only, and a --resume
    # given as a run's folder continues that run in a rerun, unlike the state it names now (rerun_continues).
    given = {}  # read, never written: parse_config gives each config a dict of its own

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The CPU recipe: what a run on the CPU starts from instead of the field defaults
# (the GPU recipe). Chosen on the held-out validation split of the monkey set on
# a 2-core machine, never on its test split (benchmarks/RESULTS.md): small
# images and fewer epochs, so that a laptop trains a usable model in
# minutes. Workers keep their default (the cores): with the views decoded once
# and resident in memory, a CPU run only uses them if its data has to stream.
# Batch, learning rate, warm-up and EMA equal the GPU recipe's today; they are
# listed so that a change to the GPU recipe does not silently change this one.
CPU_RECIPE = dict(image_size=64, epochs=45, batch_size=64, lr=0.1, warmup_epochs=2.0, ema_decay=0.998)
RECIPES = {"gpu": {}, "cpu": CPU_RECIPE}

# Values `--debug` sets, above the recipe (the CPU one, as --debug trains on the
# CPU) and beneath any YAML preset or flag the user gives.
DEBUG_PRESET = dict(cpu=True, epochs=2, max_batches_per_epoch=3, batch_size=16)

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field; unset flags stay absent."""
    parser = FlagParser(
        prog="monkeytrain train",  # runs wherever the package is installed, as a hint must
        description="Train an image classifier on an image-folder dataset.",
        argument_default=argparse.SUPPRESS,
        other_names=OTHER_NAMES,
        unmatched=UNMATCHED_FLAGS,
    )
    parser.add_argument("--config", metavar="FILE.yaml", action=OnePreset, help="YAML preset; flags override it.")
    parser.add_argument("--version", action="version", version=f"monkeytrain {__version__}")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        if "choices" in extra:  # old values are accepted here, then renamed with a warning
            extra["choices"] += tuple(old for (name, old) in RENAMED_VALUES if name == f.name)
        help_text = f"{f.metadata['help']}{shown_default(f)}"
        if _base_type(f) is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, *SHORT_FLAGS.get(f.name, ()), type=_base_type(f), help=help_text, **extra)
    for old, new in RENAMED_FIELDS.items():
        parser.add_argument("--" + old.replace("_", "-"), type=_base_type(FIELDS[new]), help=argparse.SUPPRESS)
    return parser


class OnePreset(argparse.Action):
    """--config, given once: argparse keeps the last of two silently, and a run given a model's preset and
    then an experiment's trained without the first. timm's train.py reads one -c too."""

    def __call__(self, parser, namespace, values, option_string=None):
        earlier = getattr(namespace, self.dest, None)
        if earlier is not None:
            raise UserError(f"--config is given twice ({earlier}, then {values}), and a run reads one preset; "
                            "put the keys of both in one file, or give the values of one as flags.")
        setattr(namespace, self.dest, values)


def shown_default(f: dataclasses.Field) -> str:
    """' (default: 150; CPU recipe: 45)' after a flag's help. Nothing for a default of None: its help says
    in words what happens then (the cores, a timestamp, from scratch), and '(default: None)' would
    contradict it."""
    if f.default is None:
        return ""
    recipe = f"; CPU recipe: {CPU_RECIPE[f.name]}" if f.name in CPU_RECIPE else ""
    return f" (default: {f.default}{recipe})"


def _base_type(f: dataclasses.Field) -> type:
    annotation = str(f.type).replace("Optional[", "").rstrip("]")
    return {"str": str, "int": int, "float": float, "bool": bool}[annotation]


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Resolve defaults, the device's recipe, the debug preset, a YAML preset and flags into one config."""
    cli = vars(build_parser().parse_args(argv))
    preset_path = cli.pop("config", None)
    overrides = rename_old_names({**(load_yaml_preset(Path(preset_path)) if preset_path else {}), **cli})
    debug = DEBUG_PRESET if overrides.get("debug") else {}
    recipe = resolve_recipe(overrides.get("recipe", "auto"), {**debug, **overrides}.get("cpu", False))
    config = TrainConfig(**{**RECIPES.get(recipe, {}), **debug, **overrides, "recipe": recipe})
    config.given = overrides
    validate(config)
    mirror_follows_hflip(config)
    from monkeytrain.statestore import resumed_state  # here: importing config (inspect-data) needs no torch

    config.resume = resumed_state(config.resume)  # a run's folder: its newest state, where the run continues
    return config


def mirror_follows_hflip(config: TrainConfig) -> None:
    """A run that never mirrors its training images (--hflip 0: left and right differ in its data) evaluates
    without the mirror image too, unless --tta-flip is given: averaging each image's logits with its mirror's
    scores a mirror pair alike, so it could not tell left from right. config.yaml and the checkpoint record
    tta_flip, so predict, evaluate and export of the run's checkpoint leave the mirror out as well."""
    if config.hflip > 0:
        return
    if "tta_flip" not in config.given:
        config.tta_flip = False
    elif config.tta_flip:
        warn_from_the_first_process(
            "--hflip 0 with --tta-flip: evaluation averages each image with its mirror image, so an image and its "
            "mirror score alike and classes that differ by left and right cannot be told apart; leave --tta-flip "
            "out for such data.")


def rename_old_names(values: dict[str, Any], say_so: bool = True) -> dict[str, Any]:
    """Old flag names and values under their new ones, with one warning line each from the run (none
    with `say_so` False: for a caller that reads flags parse_config has read and warned about)."""
    renamed = dict(values)
    # Flags are read before the Accelerator exists, so the launcher's RANK is what says which process is
    # the run's first: the others rename silently, rather than print the same line once per GPU.
    say = warn_from_the_first_process if say_so else lambda message: None
    for old, new in RENAMED_FIELDS.items():
        if old in renamed:
            say(f"--{flag_name(old)} is now called --{flag_name(new)}; using it.")
            renamed[new] = renamed.pop(old)
    for (name, old), new in RENAMED_VALUES.items():
        if renamed.get(name) == old:
            say(f"--{flag_name(name)} {old} is now called {new}; using {new}.")
            renamed[name] = new
    return renamed


def flag_name(field_name: str) -> str:
    return field_name.replace("_", "-")


PATH_FIELDS = ("config", "data", "train_dir", "val_dir", "test_dir")  # flags that name a file or folder
# Paths that, when given, replace a default (a folder, the synthetic set, training from scratch)
GIVEN_PATH_FIELDS = ("data", "train_dir", "val_dir", "test_dir", "pretrained", "output_dir")
HOME_PATH_FIELDS = (*GIVEN_PATH_FIELDS, "cache_dir", "resume")  # where a preset's ~ is the home folder


def with_absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """Flag values as runs and studies compare them: data/x given in the checkout and $PWD/data/x in a
    job script (as the README's examples have it) are the same folder, from the same working directory;
    so are a link to a folder and the folder (data/x linking to a shared copy, given by either path)."""
    from monkeytrain.data.synthetic import BUILTIN  # here: the data code imports this module

    return {name: os.path.realpath(value) if name in PATH_FIELDS and value and not value.startswith(BUILTIN) else value
            for name, value in values.items()}


def warn(message: str) -> None:
    to_stderr("warning", message)


def warn_from_the_first_process(message: str) -> None:
    """A warning every process of a run would give alike (of the data or the flags), given once: by the
    launcher's first process (RANK 0, or no launcher)."""
    if os.environ.get("RANK", "0") == "0":
        warn(message)


def resolve_recipe(requested: str, cpu_flag: bool) -> str:
    """gpu or cpu: the one asked for, or with auto the one of the device the run will train on."""
    if requested != "auto":
        return requested
    import torch  # here, so that --help and config checks stay quick
    from accelerate.utils import parse_flag_from_env

    on_cpu = cpu_flag or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return "cpu" if on_cpu else "gpu"


def load_yaml_preset(path: Path) -> dict[str, Any]:
    """Read a YAML mapping of config keys (dashes or underscores), checking names and types."""
    raw = read_yaml_file(path, "config file", "--config") or {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must be a mapping of option names to values.")
    names = field_names(raw, path)
    check_known_keys(names, path)
    values = {name: _coerce(FIELDS[RENAMED_FIELDS.get(name, name)], raw[key], f"key '{key}' in {path}")
              for key, name in names.items()}
    # ~ as a shell would read it on the command line: no YAML reader does, and `data: ~/monkeys` would
    # otherwise be a folder named ~ that "does not exist", beside the one the user sees.
    return {name: os.path.expanduser(value) if name in HOME_PATH_FIELDS and isinstance(value, str) else value
            for name, value in values.items()}


# Names other trainers give options that monkeytrain has under its own: timm's train.py (the keys of its
# args.yaml) and a learning rate in full. Their values may differ too (amp: true, scale: [0.08, 1.0]), so
# they are named in the error, not taken.
OTHER_NAMES = {"opt": "optimizer", "smoothing": "label_smoothing", "img_size": "image_size",
               "input_size": "image_size", "workers": "num_workers", "data_dir": "data", "clip_grad": "clip_grad_norm",
               "mixup": "mixup_alpha", "cutmix": "cutmix_alpha", "mixup_prob": "mix_prob",
               "mixup_switch_prob": "mix_switch_prob", "reprob": "random_erasing", "model_ema": "ema_decay",
               "model_ema_decay": "ema_decay",
               "torchcompile": "compile", "amp": "mixed_precision", "amp_dtype": "mixed_precision",
               "scale": "min_crop_scale", "output": "output_dir", "experiment": "run_name",
               "checkpoint_hist": "keep_states", "log_wandb": "report_to", "lr_base": "lr", "learning_rate": "lr"}
# More names of timm's train.py, and of Hugging Face's Trainer, for what monkeytrain has under its own.
OTHER_NAMES.update({"drop": "drop_rate", "drop_path": "drop_path_rate", "eval_metric": "select_on",
                    "resume_from_checkpoint": "resume", "gradient_accumulation_steps": "grad_accum_steps"})
SHORT_FLAGS = {"batch_size": ("-b",), "num_workers": ("-j",)}  # timm's train.py's short flags, the same here
# Flags (and preset keys) of timm's train.py and of the launchers that monkeytrain has no equivalent for, each with
# what it does instead: the spelling closest to them would be a wrong hint (--sched is not --seed).
SCHEDULE = "the learning rate always warms up linearly for --warmup-epochs, then follows a cosine down to 0"
BATCH_NORM = ("there is no SyncBatchNorm; each process normalises its own batches, and all take the main process's "
              "BatchNorm statistics before each forward and at each epoch's end, as timm's --dist-bn broadcast does")
AUGMENTATIONS = ("the augmentations here are --hflip, --rotation, --color-jitter, --mixup-alpha, --cutmix-alpha and "
                 "--random-erasing")
ERASING = "--random-erasing always fills one rectangle an image with per-pixel noise, as timm's --remode pixel"
LAUNCHER_FLAG = "a flag of {}: put it before monkeytrain/train.py"
UNMATCHED_FLAGS = {
    **dict.fromkeys(("sched", "min_lr", "warmup_lr", "cooldown_epochs", "decay_epochs", "decay_rate"), SCHEDULE),
    "num_classes": "the classes are the class folders of the data",
    "initial_checkpoint": "start from a weights file with --pretrained FILE",
    "channels_last": "monkeytrain always trains in the channels-last memory format",
    "sync_bn": BATCH_NORM, "dist_bn": BATCH_NORM,
    **dict.fromkeys(("mean", "std"), "the normalisation is measured on the training split and saved in the checkpoint"),
    "crop_pct": "evaluation always takes the centre 0.875 of each image, timm's default",
    "interpolation": "images are always resized bilinearly",
    "vflip": "no vertical flip; --hflip mirrors left and right",
    **dict.fromkeys(("remode", "recount"), ERASING),
    "aa": f"no AutoAugment or RandAugment; {AUGMENTATIONS}",
    "device": "the launcher picks the device; --cpu trains on the CPU, CUDA_VISIBLE_DEVICES picks the GPUs",
    "local_rank": "each process takes its rank from the environment its launcher sets: start processes with accelerate "
                  "launch or torchrun; torch.distributed.launch passes --local-rank unless given --use-env",
    "grad_checkpointing": "no gradient checkpointing; to save memory, give a smaller --batch-size with "
                          "--grad-accum-steps",
    **dict.fromkeys(("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port",
                     "multi_gpu", "config_file", "gpu_ids", "num_cpu_threads_per_process", "dynamo_backend",
                     "same_network", "rdzv_backend", "max_restarts", "use_deepspeed", "use_fsdp", "quiet"),
                    LAUNCHER_FLAG.format("accelerate launch")),
    **dict.fromkeys(("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port", "rdzv_endpoint",
                     "standalone"), LAUNCHER_FLAG.format("torchrun")),
}
ACCELERATE_KEYS = {"compute_environment", "distributed_type"}  # what every `accelerate config` file has
MAX_LISTED_KEYS = 8  # a whole args.yaml of another trainer has a hundred: the first ones say enough


def check_known_keys(names: dict[Any, str], path: Path) -> None:
    """Every key of a preset names a config field; the error names all the others at once (a timm args.yaml
    has several), each with the key that was probably meant."""
    if any(name.lstrip("_") == "config" for name in names.values()):  # config: or --config:
        raise UserError(f"{path} has a key 'config', but a preset cannot name another preset; copy that file's "
                        "keys into this one, or give that file to --config instead.")
    if ACCELERATE_KEYS & set(names.values()):
        raise UserError(f"{path} is an Accelerate config, not a monkeytrain preset; give it to accelerate launch "
                        f"--config_file {path}, before monkeytrain/train.py.")
    unknown = [f"'{key}'{meant_key(name)}" for key, name in names.items()
               if RENAMED_FIELDS.get(name, name) not in FIELDS]
    if unknown:
        listed = unknown[0] if len(unknown) == 1 else f"{', '.join(unknown[:-1])} and {unknown[-1]}"
        if len(unknown) > MAX_LISTED_KEYS:
            listed = f"{', '.join(unknown[:MAX_LISTED_KEYS])} and {len(unknown) - MAX_LISTED_KEYS} more"
        raise UserError(f"unknown key{'s' * (len(unknown) > 1)} {listed} in {path}; valid keys are the flags listed "
                        "by --help.")


def meant_key(name: str) -> str:
    """' (did you mean epochs?)' after an unknown key: another trainer's name, a flag's dashes, or a typo."""
    bare = name.lstrip("_")  # `--lr:` copied from a command line reads as __lr
    if bare in FIELDS:
        return f" (write it as {bare}, without the dashes)"
    if bare in OTHER_NAMES:
        return f" (monkeytrain calls it {OTHER_NAMES[bare]})"
    if bare in UNMATCHED_FLAGS:
        return f" ({UNMATCHED_FLAGS[bare]})"
    close = difflib.get_close_matches(bare.lower(), FIELDS, n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else ""


class RepeatedKey(yaml.YAMLError):
    pass


class NoRepeatsLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error: PyYAML keeps the last
    silently, and a preset that sets lr twice was edited in one place and read in the other."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a list or mapping as a key is for the reader to refuse; `<<:` merges may override
            key = self.construct_object(key_node)
            if key in seen:
                raise RepeatedKey(f"'{key}' twice (again on line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_file(path: Path, what: str, flag: str) -> Any:
    """The YAML document of the file `flag` names (`what` it is, for the messages)."""
    if path.is_dir():  # a run's folder, say, for its config.yaml
        inside = f" ({path / 'config.yaml'}?)" if (path / "config.yaml").is_file() else ""
        raise UserError(f"{what} {path} is a folder; give {flag} a YAML file{inside}.")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; check the path given to {flag}.")
    try:
        return yaml.load(path.read_text(), Loader=NoRepeatsLoader)
    except RepeatedKey as repeated:
        raise UserError(f"{what} {path} gives {repeated}; keep one of them.") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not valid YAML (UnicodeDecodeError); fix its syntax (and save it as "
                        "UTF-8 text).") from None
    except (yaml.YAMLError, ValueError) as error:  # ValueError: a tagged value that is not one (!!int x)
        raise UserError(f"{what} {path} is not valid YAML ({where_yaml_failed(error)}); fix its syntax.") from None


def where_yaml_failed(error: Exception) -> str:
    """'line 3, column 2: what went wrong', as a YAML reader found it, for an editor to go to; what a line
    before began (an unclosed [) too, as the line named may be where the reader only noticed it."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or not problem:
        return " ".join(str(error).split()) or error.__class__.__name__
    where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    begun, context = getattr(error, "context_mark", None), getattr(error, "context", None)
    if begun is not None and context and begun.line != mark.line:
        where += f", {context} that began on line {begun.line + 1}"
    return where


def field_names(raw: dict, path: Path) -> dict[Any, str]:
    """Each key of a flag file with the field it sets (dashes as underscores, old names as new); one
    field set under two spellings (batch-size and batch_size) is an error, as one key given twice is."""
    names, keys_of = {}, {}
    for key in raw:
        names[key] = str(key).replace("-", "_")
        field = RENAMED_FIELDS.get(names[key], names[key])
        if field in keys_of:
            raise UserError(f"{path} sets --{flag_name(field)} twice, as '{keys_of[field]}' and as '{key}'; "
                            "keep one of them.")
        keys_of[field] = key
    return names


def reads_as(kind: type, text: str) -> bool:
    """Whether `kind` (int or float) reads `text`: a number a preset gives in quotes."""
    try:
        kind(text)
    except ValueError:
        return False
    return True


# YAML 1.1 (PyYAML) reads an unquoted no as false, and Accelerate's configs write `mixed_precision: no`:
# in this text field, false can only mean the choice no. timm's args.yaml writes `pretrained: true` (hub
# weights, as the bare flag) or `pretrained: false` (from scratch, as no flag).
YAML_BOOLEANS_MEANING = {("mixed_precision", False): "no", ("pretrained", True): "hub", ("pretrained", False): None}


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    kind = _base_type(f)
    if isinstance(value, bool) and (f.name, value) in YAML_BOOLEANS_MEANING:
        return YAML_BOOLEANS_MEANING[(f.name, value)]
    if value is None and "Optional" in str(f.type):
        return None
    if kind is bool and isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str) and reads_as(float, value):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as text
    if kind in (int, str) and type(value) is kind:
        return value
    if kind is int and isinstance(value, str) and reads_as(int, value):
        return int(value)  # "10", quoted, is 10 as "0.01" is 0.01; so timm's train.py reads its YAML too
    raise UserError(f"{where} must be of type {kind.__name__}, got {value!r}; {how_to_write(f, value)}.")


def how_to_write(f: dataclasses.Field, value: Any) -> str:
    """What to write instead of a value of the wrong type: YAML reads yes, 2024 or 1.0 as other types
    than the writer meant, and null (or nothing after the colon) as no value at all."""
    if value is None:
        return "give a value, or leave the key out for the default"
    if f.metadata.get("choices"):
        return "give {} or {}".format(*one_of(f.metadata["choices"]))
    return {int: "give a whole number, such as 10", float: "give a number, such as 0.001",
            bool: "give true or false", str: "put it in quotes to give it as text"}[_base_type(f)]


def field_type(name: str) -> type:
    """The type of a config field's values: str, int, float or bool."""
    return _base_type(FIELDS[name])


def checked_value(name: str, value: Any, where: str) -> Any:
    """`value` for the field `name` as YAML gives it, type-checked as a preset's would be."""
    return _coerce(FIELDS[name], value, where)


def validate(config: TrainConfig) -> None:
    """Reject values that cannot work, naming the flag to change."""
    not_finite = [f.name for f in FIELDS.values()
                  if isinstance(getattr(config, f.name), float) and not math.isfinite(getattr(config, f.name))]
    checks = [
        (not not_finite, f"--{flag_name((not_finite or [''])[0])} must be a finite number"),
        (config.epochs >= 1, "--epochs must be at least 1"),
        (config.epochs <= MAX_EPOCHS, f"--epochs must be at most {MAX_EPOCHS:,}"),
        (config.batch_size >= 1, "--batch-size must be at least 1"),
        (config.image_size >= MIN_IMAGE_SIZE, f"--image-size must be at least {MIN_IMAGE_SIZE} pixels"),
        (0.0 <= config.val_fraction < 1.0, "--val-fraction must be in [0, 1)"),
        (0.0 < config.test_fraction < 1.0, "--test-fraction must be in (0, 1)"),
        (config.lr > 0, "--lr must be positive"),
        (0.0 <= config.momentum < 1.0, "--momentum must be in [0, 1)"),
        (config.weight_decay >= 0, "--weight-decay must not be negative"),
        (config.rotation >= 0 and config.color_jitter >= 0, "--rotation and --color-jitter must not be negative"),
        (config.clip_grad_norm >= 0, "--clip-grad-norm must not be negative (0: no clipping)"),
        (0 <= config.seed < 2**32, "--seed must be in [0, 2**32)"),
        (config.grad_accum_steps >= 1, "--grad-accum-steps must be at least 1"),
        (config.num_workers is None or config.num_workers >= 0, "--num-workers must not be negative"),
        (config.cpu_threads is None or config.cpu_threads >= 1, "--cpu-threads must be at least 1"),
        (0.0 < config.min_crop_scale <= 1.0, "--min-crop-scale must be in (0, 1]"),
        (config.warmup_epochs >= 0, "--warmup-epochs must not be negative"),
        (0.0 <= config.label_smoothing < 1.0, "--label-smoothing must be in [0, 1)"),
        (config.max_batches_per_epoch >= 0, "--max-batches-per-epoch must not be negative"),
        (0.0 <= config.ema_decay < 1.0, "--ema-decay must be in [0, 1)"),
        (config.save_every >= 0, "--save-every must not be negative"),
        (config.save_every_minutes >= 0, "--save-every-minutes must not be negative"),
        (config.keep_states >= 1, "--keep-states must be at least 1"),
        (config.tta_shift >= 0, "--tta-shift must not be negative"),
        (config.min_train_size == 0 or MIN_IMAGE_SIZE <= config.min_train_size <= config.image_size,
         f"--min-train-size must be 0 or between {MIN_IMAGE_SIZE} and --image-size"),
        (0.0 <= config.full_size_fraction <= 1.0, "--full-size-fraction must be in [0, 1]"),
        (config.mixup_alpha >= 0, "--mixup-alpha must not be negative"),
        (config.cutmix_alpha >= 0, "--cutmix-alpha must not be negative"),
        (0.0 <= config.mix_prob <= 1.0, "--mix-prob must be in [0, 1]"),
        (0.0 <= config.mix_switch_prob <= 1.0, "--mix-switch-prob must be in [0, 1]"),
        (0.0 <= config.hflip <= 1.0, "--hflip must be in [0, 1]"),
        (0.0 <= config.random_erasing <= 1.0, "--random-erasing must be in [0, 1]"),
        (0.0 <= config.drop_rate < 1.0, "--drop-rate must be in [0, 1)"),
        (0.0 <= config.drop_path_rate < 1.0, "--drop-path-rate must be in [0, 1)"),
    ]
    for f in FIELDS.values():
        choices, value = f.metadata.get("choices"), getattr(config, f.name)
        if choices and value is not None:
            checks.append((value in choices, f"--{flag_name(f.name)} must be {' or '.join(one_of(choices))}"
                                             + meant_choice(value, choices)))
    for ok, message in checks:
        if not ok:
            raise UserError(f"{message}; fix the flag or the config file.")
    check_data_flags(config)
    from monkeytrain.model import check_model_choice  # here: importing config (inspect-data) needs no torch

    check_model_choice(config.model, config.pretrained)


def check_data_flags(config: TrainConfig) -> None:
    """The flags that say where the data is: no empty path, and a root or split folders, not both
    (inspect-data checks its flags with this too)."""
    check_no_empty_path(config)
    if config.data and (config.train_dir or config.val_dir or config.test_dir):
        raise UserError("give either --data or --train-dir/--val-dir/--test-dir, not both.")


def check_no_empty_path(config: TrainConfig) -> None:
    """A path flag given as "" is refused: it is what `--data "$DATA"` passes when DATA is unset, and
    taking it as "not given" would train on the default folder or the synthetic set instead (an empty
    --output-dir: write runs into the current folder; an empty --run-name: start a new run, not resume one)."""
    for name in (*GIVEN_PATH_FIELDS, "run_name"):
        if getattr(config, name) == "":
            what = "a name" if name == "run_name" else "a path"
            raise UserError(f"--{flag_name(name)} is empty (an unset shell variable?); give {what}, or leave "
                            "the flag (or config key) out for its default.")


def meant_choice(value: Any, choices: Sequence[str]) -> str:
    """' (did you mean gpu?)' for a preset's `recipe: GPU`, as the command line says for --recipe GPU."""
    meant = nearest_choice(str(value), list(choices))
    return f" (did you mean {meant}?)" if meant else ""


def one_of(choices: Sequence[str]) -> tuple[str, str]:
    """("a, b", "c") for the values a, b and c: to read "a, b or c"."""
    return ", ".join(choices[:-1]), choices[-1]


def recorded_config(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as a run records it (config.yaml) and a resume is checked against, so that
    `--config runs/NAME/config.yaml --run-name again` repeats the run, in another shell or on another machine:
    - the data root that $MONKEYTRAIN_DATA or the default folder gave, as an absolute path, where no flag
      named the data (null would train on that shell's default data, silently), and the built-in synthetic
      set by its name (synthetic.DATA_NAME); null stays for split folders;
    - the files and folders it read, --data, the split folders, --pretrained and --cache-dir, as absolute
      paths: as given (data/x), the run's config.yaml given from another folder would read another data/x,
      or none;
    - --resume auto for a run resumed from a state folder (RUN/state/step-N), which continues that run only:
      another run given it is refused."""
    # Here, not at the top: the data code imports this module.
    from monkeytrain.data.dataset import explicit_dirs, user_data_root
    from monkeytrain.data.synthetic import DATA_NAME

    values = config.to_dict()
    if not config.data:
        root = user_data_root(config)
        values["data"] = os.path.abspath(root) if root else None if explicit_dirs(config) else DATA_NAME
    values.update({name: os.path.abspath(values[name]) for name in RECORDED_ABSOLUTE
                   if names_a_path(name, values[name])})
    if config.resume:
        values["resume"] = "auto"
    return values


# What a run reads, recorded as an absolute path (see recorded_config); where it writes (--output-dir) stays as
# given, so that a run repeated elsewhere writes there.
RECORDED_ABSOLUTE = ("data", "train_dir", "val_dir", "test_dir", "pretrained", "cache_dir")


def names_a_path(name: str, value: Any) -> bool:
    """Whether the value of a RECORDED_ABSOLUTE field is a path: not the built-in synthetic set's name, nor
    the bare --pretrained (the hub's weights)."""
    from monkeytrain.data.synthetic import BUILTIN  # here: the data code imports this module

    return bool(value) and not str(value).startswith(BUILTIN) and not (
        name == "pretrained" and value == FIELDS["pretrained"].metadata["const"])


def config_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML (see recorded_config), loadable again with --config."""
    return yaml.safe_dump(recorded_config(config), sort_keys=False)
