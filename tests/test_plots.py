"""curves.png and confusion_matrix.png: the series behind them, what they show, valid PNG files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from monkeytrain import plots
from monkeytrain.plots import (
    CONFUSION_NAME,
    CURVES_NAME,
    MAX_LABEL_CHARACTERS,
    MAX_LABELLED_CLASSES,
    confusion_figure,
    curves_figure,
    highest_epoch,
    plot_confusion_matrix,
    plot_curves,
    read_metrics,
    write_run_plots,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def epoch_line(epoch: int, val_accuracy: float, **extra) -> str:
    record = dict(epoch=epoch, epochs=3, train_loss=2.0 / epoch, train_accuracy=0.3 * epoch,
                  val_loss=2.5 / epoch, val_accuracy=val_accuracy, **extra)
    return json.dumps(record)


def write_metrics(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_png(path: Path, min_width: int, min_height: int) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert min_width <= width <= 4000 and min_height <= height <= 4000  # 30 inches at 110 dpi at most
    assert 5_000 < path.stat().st_size < 2_000_000


def test_read_metrics_gives_one_value_per_epoch_in_order(tmp_path):
    path = write_metrics(tmp_path / "metrics.jsonl", [
        epoch_line(2, 0.5),
        epoch_line(1, 0.25),
        epoch_line(2, 0.6),                    # a requeued job logged epoch 2 again: this one wins
        json.dumps({"epoch": 3, "train_loss": 0.5}),  # values missing from a line
        '{"epoch": 4, "train_lo',              # cut short by a killed job
        "",
        json.dumps({"epoch": 5, "train_loss": None, "val_accuracy": 0.7}),  # not trained again after a resume
    ])
    series = read_metrics(path)
    assert series["epoch"] == [1, 2, 3, 5]
    assert series["val_accuracy"][:2] == [0.25, 0.6]
    assert math.isnan(series["val_accuracy"][2])
    assert series["train_loss"][:3] == [2.0, 1.0, 0.5] and math.isnan(series["train_loss"][3])
    assert series["train_accuracy"][:2] == pytest.approx([0.3, 0.6])


def test_read_metrics_of_a_missing_file_is_empty(tmp_path):
    assert read_metrics(tmp_path / "metrics.jsonl") == {
        "epoch": [], "train_loss": [], "val_loss": [], "train_accuracy": [], "val_accuracy": [],
        "val_balanced_accuracy": []}


def test_highest_epoch_is_the_first_of_the_best_and_ignores_nan():
    assert highest_epoch([1, 2, 3, 4], [0.2, 0.7, math.nan, 0.7]) == 2
    assert highest_epoch([1, 2], [math.nan, math.nan]) is None
    assert highest_epoch([], []) is None


def test_curves_show_train_and_validation_loss_and_accuracy(tmp_path):
    series = read_metrics(write_metrics(tmp_path / "metrics.jsonl",
                                        [epoch_line(1, 0.2), epoch_line(2, 0.5), epoch_line(3, 0.5)]))
    loss_axes, accuracy_axes = curves_figure(series, best_epoch=3).axes
    loss_lines = {line.get_label(): list(line.get_ydata()) for line in loss_axes.get_lines()}
    assert loss_lines == {"train": [2.0, 1.0, 2.0 / 3], "validation": [2.5, 1.25, 2.5 / 3]}
    accuracy_lines = {line.get_label(): list(line.get_ydata()) for line in accuracy_axes.get_lines()}
    assert accuracy_lines["validation"] == [0.2, 0.5, 0.5]
    assert accuracy_lines["best 50.0% (epoch 3)"] == [0.5]  # the selected epoch, not the first 50%


def test_curves_star_the_highest_epoch_without_a_selected_one(tmp_path):
    series = read_metrics(write_metrics(tmp_path / "metrics.jsonl", [epoch_line(1, 0.4), epoch_line(2, 0.3)]))
    labels = [line.get_label() for line in curves_figure(series).axes[1].get_lines()]
    assert "best 40.0% (epoch 1)" in labels


def test_a_diverged_epoch_as_metrics_jsonl_holds_it_is_a_gap_in_the_curves(tmp_path):
    """Its NaN and infinite losses are written as null (strict JSON) with their values under "not_finite"."""
    from monkeytrain.tracking import metrics_line

    diverged = {**json.loads(epoch_line(2, 0.1)), "train_loss": math.inf, "val_loss": math.nan}
    path = tmp_path / "metrics.jsonl"
    path.write_text(epoch_line(1, 0.4) + "\n" + metrics_line(diverged))
    series = read_metrics(path)
    assert series["train_loss"][0] == 2.0 and math.isnan(series["train_loss"][1])
    assert math.isnan(series["val_loss"][1]) and series["val_accuracy"] == [0.4, 0.1]


def test_plot_curves_writes_a_png(tmp_path):
    series = read_metrics(write_metrics(tmp_path / "metrics.jsonl", [epoch_line(e, 0.1 * e) for e in (1, 2, 3)]))
    path = plot_curves(series, tmp_path / CURVES_NAME, best_epoch=3)
    assert path == tmp_path / CURVES_NAME
    assert_png(path, min_width=800, min_height=300)


def test_plot_curves_of_no_epochs_still_writes_a_png(tmp_path):
    assert_png(plot_curves(read_metrics(tmp_path / "absent.jsonl"), tmp_path / CURVES_NAME), 800, 300)


def test_confusion_figure_names_both_axes_and_writes_every_count():
    matrix = [[5, 1, 0], [0, 4, 2], [1, 0, 7]]
    names = ["howler", "patas", "uakari"]
    axes = confusion_figure(matrix, names).axes[0]
    assert [label.get_text() for label in axes.get_xticklabels()] == names
    assert [label.get_text() for label in axes.get_yticklabels()] == names
    assert [text.get_text() for text in axes.texts] == ["5", "1", "0", "0", "4", "2", "1", "0", "7"]
    assert (axes.texts[8].get_position()) == (2, 2)  # [true][predicted]: row 2, column 2
    assert (axes.texts[5].get_position()) == (2, 1)  # true 1 predicted 2: x is the prediction
    assert "16 of 20 correct (80.0%)" in axes.get_title()


def test_plot_confusion_matrix_writes_a_png(tmp_path):
    names = [f"class_with_a_long_name_{i}" for i in range(10)]
    matrix = [[20 if t == p else t % 3 for p in range(10)] for t in range(10)]
    path = plot_confusion_matrix(matrix, names, tmp_path / CONFUSION_NAME)
    assert_png(path, min_width=700, min_height=700)


def test_class_names_no_font_can_draw_are_one_warning_line_not_matplotlibs(tmp_path, recwarn, capsys, monkeypatch):
    """Boxes in place of '東京' said nothing: two CJK classes looked alike, and nothing told that the picture lost
    its names. No fallback font here (none installed on the test machine draws CJK either)."""
    monkeypatch.setattr(plots, "FALLBACK_FONTS", (), raising=False)
    path = plot_confusion_matrix([[3, 1, 0], [0, 4, 0], [0, 0, 1]], ["狗", "cat", "猫猫"], tmp_path / CONFUSION_NAME)
    assert_png(path, min_width=300, min_height=300)
    # matplotlib's own ("Glyph 29399 missing from font(s) DejaVu Sans"), not a file another test left unclosed
    assert [str(w.message) for w in recwarn if "glyph" in str(w.message).lower()] == []
    assert capsys.readouterr().err == (
        "monkeytrain: warning: confusion_matrix.png shows 2 of the 3 class names ('狗' among them) as empty boxes: no "
        "installed font draws their characters; results.json and its confusion matrix hold the names (installed, a "
        "font such as Noto Sans CJK draws them).\n")


def test_class_names_are_drawn_in_an_installed_fallback_font_where_the_default_lacks_them(tmp_path, capsys,
                                                                                         monkeypatch):
    """DejaVu Sans lacks the arc (U+2312) that DejaVu Sans Mono has, as it lacks CJK that Noto Sans CJK has."""
    monkeypatch.setattr(plots, "FALLBACK_FONTS", ("Not Installed Anywhere", "DejaVu Sans Mono"), raising=False)
    axes = confusion_figure([[1, 0], [0, 1]], ["⌒ arc", "line"]).axes[0]
    assert axes.get_xticklabels()[0].get_fontfamily() == ["sans-serif", "DejaVu Sans Mono"]
    plot_confusion_matrix([[1, 0], [0, 1]], ["⌒ arc", "line"], tmp_path / CONFUSION_NAME)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("matrix, names", [
    ([[1, 2], [3, 4]], ["a", "b", "c"]),        # fewer rows than names
    ([[1, 2, 3], [4, 5, 6]], ["a", "b"]),       # not square
    ([[1, 2], [3]], ["a", "b"]),                # ragged
    ([], []),                                   # no classes
    ([[1, -1], [0, 2]], ["a", "b"]),            # negative count
])
def test_plot_confusion_matrix_refuses_a_matrix_that_does_not_fit(tmp_path, matrix, names):
    with pytest.raises(ValueError, match="confusion matrix"):
        plot_confusion_matrix(matrix, names, tmp_path / CONFUSION_NAME)
    assert not (tmp_path / CONFUSION_NAME).exists()


def test_many_classes_give_a_bounded_picture_without_cell_counts(tmp_path):
    names = [f"c{i}" for i in range(60)]  # over 40 classes, and over the size cap
    matrix = [[1 if t == p else 0 for p in range(60)] for t in range(60)]
    figure = confusion_figure(matrix, names)
    assert len(figure.axes[0].texts) == 0
    assert max(figure.get_size_inches()) <= 31
    assert_png(plot_confusion_matrix(matrix, names, tmp_path / CONFUSION_NAME), 2000, 2000)


def test_long_class_names_are_shortened_in_the_middle_and_stay_apart():
    names = [f"Weißstorch_ñ 白鹳 Ciconia ciconia, a long descriptive name, species {i}" for i in range(120)]
    axes = confusion_figure(diagonal(120), names).axes[0]
    labels = [label.get_text() for label in axes.get_yticklabels()]
    assert len(labels) == 120 and len(set(labels)) == 120  # the ends that tell them apart are kept
    assert all(len(label) <= MAX_LABEL_CHARACTERS for label in labels)
    assert labels[7].startswith("Weißstorch_ñ 白鹳") and labels[7].endswith("species 7") and "…" in labels[7]
    assert {label.get_rotation() for label in axes.get_xticklabels()} == {90}  # upright: no overlap


def test_beyond_the_labelled_classes_every_kth_is_named_with_its_index():
    n = 3 * MAX_LABELLED_CLASSES + 1
    axes = confusion_figure(diagonal(n), [f"class {i}" for i in range(n)]).axes[0]
    labels = [label.get_text() for label in axes.get_xticklabels()]
    assert len(labels) <= MAX_LABELLED_CLASSES
    assert labels[:2] == ["0: class 0", "4: class 4"] and axes.get_xlabel() == "predicted (one class in 4 named)"


def diagonal(n: int) -> list[list[int]]:
    return [[int(t == p) for p in range(n)] for t in range(n)]


def test_write_run_plots_writes_both_files_into_the_run_directory(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", [epoch_line(1, 0.5), epoch_line(2, 0.75)])
    results = {"confusion_matrix": [[3, 1], [0, 4]], "class_names": ["a", "b"], "best_epoch": 2}
    assert write_run_plots(tmp_path, results) == [tmp_path / CURVES_NAME, tmp_path / CONFUSION_NAME]
    assert_png(tmp_path / CURVES_NAME, 800, 300)
    assert_png(tmp_path / CONFUSION_NAME, 400, 400)


def test_a_run_chosen_on_balanced_accuracy_stars_its_epoch_on_the_balanced_curve(tmp_path):
    lines = [epoch_line(1, 0.8, val_balanced_accuracy=0.5), epoch_line(2, 0.7, val_balanced_accuracy=0.65)]
    series = read_metrics(write_metrics(tmp_path / "metrics.jsonl", lines))
    accuracy_lines = {line.get_label(): list(line.get_ydata())
                      for line in curves_figure(series, 2, "balanced-accuracy").axes[1].get_lines()}
    assert accuracy_lines["validation, balanced"] == [0.5, 0.65]
    assert accuracy_lines["best, balanced 65.0% (epoch 2)"] == [0.65]  # not the epoch of highest accuracy
    chosen_on_accuracy = [line.get_label() for line in curves_figure(series, 1, "accuracy").axes[1].get_lines()]
    assert "best 80.0% (epoch 1)" in chosen_on_accuracy
