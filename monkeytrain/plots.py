"""The two pictures every run directory gets: learning curves and the test confusion matrix.

Drawn on matplotlib's Agg canvas directly (no pyplot), so nothing needs a
display and no global backend state is touched inside a training process.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from monkeytrain.errors import to_stderr
from monkeytrain.selection import BALANCED, PLAIN
from monkeytrain.storage import write_atomically

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVES_NAME = "curves.png"
CONFUSION_NAME = "confusion_matrix.png"
SERIES = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_balanced_accuracy")
MAX_FIGURE_INCHES = 30  # Agg refuses images over 2**16 pixels a side; 1000 classes must not end a run
MAX_ANNOTATED_CLASSES = 40  # beyond this the count in each cell is too small to read
MAX_LABELLED_CLASSES = 150  # more ticks than this on 30 inches would be under 7 pt apart: every k-th is named
MAX_LABEL_CHARACTERS = 32  # a longer class name is cut in its middle; the matrix keeps its room
# Fonts that draw what matplotlib's own DejaVu Sans lacks, CJK above all, each used where installed: matplotlib
# (>= 3.6) draws a character in the first font of a family list that has it.
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR", "Source Han Sans",
                  "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback", "Arial Unicode MS",
                  "Microsoft YaHei", "Hiragino Sans", "PingFang SC", "Malgun Gothic", "Noto Sans")
MISSING_GLYPH = re.compile(r"^Glyph (\d+) .*missing from font")  # matplotlib's warning, as it draws a box


def read_metrics(path: Path) -> dict[str, list[float]]:
    """Per-epoch series from metrics.jsonl: {"epoch": [1, 2, ...], "train_loss": [...], ...}.

    A requeued job may log an epoch again, so the last line for an epoch wins;
    a line cut short by a killed job is skipped rather than losing the plot.
    Missing or null values (not measured, or not finite: tracking.metrics_line) are NaN; a missing file
    gives empty series.
    """
    by_epoch: dict[int, dict] = {}
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "epoch" in record:
            by_epoch[int(record["epoch"])] = record
    epochs = sorted(by_epoch)
    series = {name: [number(by_epoch[e].get(name)) for e in epochs] for name in SERIES}
    return {"epoch": epochs, **series}


def number(value) -> float:
    """A logged figure as a float; NaN (a gap in the curve) where the epoch has none."""
    return math.nan if value is None else float(value)


def plot_curves(series: dict[str, list[float]], path: Path, best_epoch: int | None = None,
                selected_on: str = PLAIN) -> Path:
    save(curves_figure(series, best_epoch, selected_on), path)
    return path


def curves_figure(series: dict[str, list[float]], best_epoch: int | None = None,
                  selected_on: str = PLAIN) -> Figure:
    """Two panels, loss and accuracy per epoch, train and validation, and the balanced validation accuracy
    where metrics.jsonl has it.

    `best_epoch` (the selected one, from results.json) is starred on the curve of the figure that chose it
    (`selected_on`, results.json's: accuracy or balanced-accuracy); without it, the epoch of highest
    validation accuracy.
    """
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    figure = new_figure(figsize=(11, 4.2), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    epochs = series["epoch"]
    marker = "o" if len(epochs) <= 30 else None  # a 2-epoch debug run would otherwise show nothing
    for axes, kind in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        axes.plot(epochs, series[f"train_{kind}"], marker=marker, label="train")
        axes.plot(epochs, series[f"val_{kind}"], marker=marker, label="validation")
        axes.set(title=kind, xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    balanced = series.get("val_balanced_accuracy", [])
    if any(not math.isnan(value) for value in balanced):  # runs before it was logged have none
        accuracy_axes.plot(epochs, balanced, marker=marker, linestyle="--", label="validation, balanced")
    accuracy_axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    mark_best(accuracy_axes, epochs, *starred_curve(series, best_epoch, selected_on), best_epoch)
    loss_axes.legend()
    accuracy_axes.legend()
    return figure


def starred_curve(series: dict[str, list[float]], best_epoch: int | None, selected_on: str) -> tuple[list, str]:
    """The curve whose figure chose the best epoch, and the star's word for it."""
    balanced = series.get("val_balanced_accuracy", [])
    if selected_on == BALANCED and best_epoch in series["epoch"]:
        if not math.isnan(balanced[series["epoch"].index(best_epoch)]):
            return balanced, "best, balanced"
    return series["val_accuracy"], "best"


def mark_best(axes, epochs: list[int], accuracies: list[float], what: str, best_epoch: int | None) -> None:
    if best_epoch not in epochs:
        best_epoch = highest_epoch(epochs, accuracies)
    if best_epoch is None:
        return
    accuracy = accuracies[epochs.index(best_epoch)]
    axes.plot([best_epoch], [accuracy], "k*", markersize=12, label=f"{what} {accuracy:.1%} (epoch {best_epoch})")


def highest_epoch(epochs: list[int], accuracies: list[float]) -> int | None:
    """The first epoch of highest accuracy, ignoring NaN; None when there is none."""
    finite = [(a, -e) for e, a in zip(epochs, accuracies) if not math.isnan(a)]
    return -max(finite)[1] if finite else None


def plot_confusion_matrix(matrix: Sequence[Sequence[float]], class_names: Sequence[str], path: Path) -> Path:
    """confusion_matrix.png, and one warning where some class names are drawn as empty boxes."""
    missing = save(confusion_figure(matrix, class_names), path)
    undrawn = [name for name in class_names if missing & set(name)]
    if undrawn:
        to_stderr("warning", f"{path.name} shows {len(undrawn)} of the {len(class_names)} class names ('{undrawn[0]}' "
                             "among them) as empty boxes: no installed font draws their characters; results.json "
                             "and its confusion matrix hold the names (installed, a font such as Noto Sans CJK draws "
                             "them).")
    return path


def confusion_figure(matrix: Sequence[Sequence[float]], class_names: Sequence[str]) -> Figure:
    """Counts [true][predicted] in each cell, shaded by the fraction of the true class.

    Raises ValueError unless `matrix` is square with one row per class name.
    """
    counts = confusion_array(matrix, class_names)
    n = len(class_names)
    # Shade by row fraction so a small class's mistakes are as visible as a big one's.
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(max(4.5, 0.65 * n + 3), MAX_FIGURE_INCHES)
    figure = new_figure(figsize=(side + 1, side), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, shrink=0.8, label="fraction of the true class")
    label_classes(axes, class_names)
    total, correct = counts.sum(), np.trace(counts)
    axes.set_title(f"test split: {correct:.0f} of {total:.0f} correct ({correct / max(total, 1):.1%})")
    if n <= MAX_ANNOTATED_CLASSES:
        write_counts(axes, counts, fractions)
    return figure


def label_classes(axes, class_names: Sequence[str]) -> None:
    """Class names along both axes, in type no taller than the rows they name."""
    n = len(class_names)
    ticks, labels = class_ticks(class_names)
    size = min(10, max(5, 1000 / len(ticks)))
    # Slanted names read well when few; many would overlap their neighbours unless upright.
    slant = dict(rotation=45, ha="right", rotation_mode="anchor") if n <= MAX_ANNOTATED_CLASSES else dict(rotation=90)
    fonts = class_name_fonts()
    axes.set_xticks(ticks, labels=labels, fontsize=size, fontfamily=fonts, **slant)
    axes.set_yticks(ticks, labels=labels, fontsize=size, fontfamily=fonts)
    named = "" if len(ticks) == n else f" (one class in {ticks[1]} named)"
    axes.set(xlabel=f"predicted{named}", ylabel=f"true{named}")


def class_name_fonts() -> list[str]:
    """The font families of the class names: matplotlib's default, then each of FALLBACK_FONTS installed (one
    that is not would cost a findfont warning of its own). Set on the labels, not in rcParams: no global state."""
    from matplotlib import font_manager, rcParams

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return [*rcParams["font.family"], *(name for name in FALLBACK_FONTS if name in installed)]


def class_ticks(class_names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """The class ticks of both axes: every class, or beyond MAX_LABELLED_CLASSES every k-th, its index
    first so that the row can be found in results.json. Long names are shortened (see `shortened`)."""
    n = len(class_names)
    stride = math.ceil(n / MAX_LABELLED_CLASSES)
    ticks = np.arange(0, n, stride)
    labels = [shortened(class_names[i]) for i in ticks]
    return ticks, labels if stride == 1 else [f"{i}: {label}" for i, label in zip(ticks, labels)]


def shortened(name: str) -> str:
    """At most MAX_LABEL_CHARACTERS, cut in the middle: a name is recognised by its start, but names of a
    series often differ only at their end ("... species 3", "... species 7")."""
    if len(name) <= MAX_LABEL_CHARACTERS:
        return name
    tail = (MAX_LABEL_CHARACTERS - 1) // 3
    return f"{name[:MAX_LABEL_CHARACTERS - 1 - tail]}…{name[-tail:]}"


def confusion_array(matrix: Sequence[Sequence[float]], class_names: Sequence[str]) -> np.ndarray:
    try:
        counts = np.asarray(matrix, dtype=float)
    except ValueError:
        raise ValueError("confusion matrix rows differ in length") from None
    n = len(class_names)
    if n == 0 or counts.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not match "
                         f"{n} class names; expected ({n}, {n})")
    if (counts < 0).any():
        raise ValueError("confusion matrix holds negative counts")
    return counts


def write_counts(axes, counts: np.ndarray, fractions: np.ndarray) -> None:
    n = counts.shape[0]
    size = 10 if n <= 12 else max(5, 120 / n)  # stay inside the cells for many classes
    for (row, column), count in np.ndenumerate(counts):
        # white stays readable on dark cells; grey zeros let the mistakes stand out
        colour = "white" if fractions[row, column] > 0.5 else "black" if count else "0.65"
        axes.text(column, row, f"{count:.0f}", ha="center", va="center", color=colour, fontsize=size)


def new_figure(**options) -> Figure:
    """A figure on the Agg canvas, attached explicitly: no display, no pyplot state.

    matplotlib is imported here, when a run ends, rather than when the package is: it adds 0.4 s to
    the start of every training process, which an error message or a short run would wait for.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**options)
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: Path) -> set[str]:
    """Write `figure` to `path` as a PNG; the characters no font of their text could draw (as empty boxes).
    matplotlib warns of each, pointing into this file, which would tell a user nothing: the caller says it once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # atomically: a disk that fills up while drawing leaves no half a picture
        write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=110), durable=False)
    missing = set()
    for warning in caught:
        glyph = MISSING_GLYPH.match(str(warning.message))
        if glyph:
            missing.add(chr(int(glyph.group(1))))
        else:  # any other, as it was
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return missing


def write_run_plots(run_dir: Path, results: dict) -> list[Path]:
    """curves.png from RUN/metrics.jsonl and confusion_matrix.png from the results dict."""
    return [
        plot_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / CURVES_NAME, results.get("best_epoch"),
                    results.get("selected_on", PLAIN)),  # results.json before --select-on: accuracy chose
        plot_confusion_matrix(results["confusion_matrix"], results["class_names"], run_dir / CONFUSION_NAME),
    ]
