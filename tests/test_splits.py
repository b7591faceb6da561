"""monkeytrain.data.splits: the stratified holdout (by content hash; by seeded shuffle for old runs' resume),
leak and conflicting-label detection.

These work on ImageFile records alone, so the tests build them directly: the
digest stands for the file's content.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from monkeytrain.data.imagefiles import ImageFile
from monkeytrain.data.splits import CONTENT_HASH, SEEDED_SHUFFLE, find_conflicts, find_leaks, stratified_holdout


def files_for(counts: dict[int, int], duplicates: int = 0) -> list[ImageFile]:
    """`counts[label]` files per class, each of unique content except that the first
    `duplicates` files of every class come as pairs with identical content."""
    files = []
    for label, count in counts.items():
        for i in range(count):
            digest = f"{label}-{i // 2}" if i < 2 * duplicates else f"{label}-unique-{i}"
            files.append(ImageFile(Path(f"/data/c{label}/{i:03d}.png"), label, digest))
    return files


def paths(files):
    return [f.path for f in files]


def test_holdout_partitions_the_files():
    files = files_for({0: 20, 1: 15, 2: 9})
    kept, held = stratified_holdout(files, 0.2, seed=0)
    assert sorted(paths(kept + held)) == sorted(paths(files))
    assert not set(paths(kept)) & set(paths(held))


def test_holdout_fraction_is_respected_per_class():
    counts = {0: 20, 1: 40, 2: 10, 3: 7}
    kept, held = stratified_holdout(files_for(counts), 0.25, seed=3)
    held_per_class = Counter(f.label for f in held)
    for label, count in counts.items():
        assert abs(held_per_class[label] - 0.25 * count) <= 1, (label, held_per_class)
    assert Counter(f.label for f in kept) + held_per_class == Counter(counts)


def test_same_seed_gives_the_same_split_whatever_the_input_order():
    files = files_for({0: 30, 1: 30})
    first = stratified_holdout(files, 0.3, seed=7)
    second = stratified_holdout(list(reversed(files)), 0.3, seed=7)
    assert paths(first[1]) == paths(second[1])
    assert paths(first[0]) == paths(second[0])


def test_different_seeds_give_different_splits():
    files = files_for({0: 30, 1: 30})
    held_by_seed = {tuple(paths(stratified_holdout(files, 0.3, seed=s)[1])) for s in range(5)}
    assert len(held_by_seed) > 1


def test_identical_files_are_never_split_across_train_and_holdout():
    files = files_for({0: 30, 1: 30}, duplicates=10)  # 10 pairs per class
    for seed in range(20):
        kept, held = stratified_holdout(files, 0.3, seed=seed)
        assert not {f.digest for f in kept} & {f.digest for f in held}, seed
    # and the pairs really do land in the holdout sometimes, so the check above means something
    held_digests = Counter(f.digest for s in range(20) for f in stratified_holdout(files, 0.3, s)[1])
    assert any(digest.count("-") == 1 for digest in held_digests)


def test_identical_files_in_two_classes_land_on_the_same_side():
    """A copy of a file in another class folder (a labelling mistake, common in scraped data): both copies
    go where the first class put it, or the holdout itself makes the leak it reports."""
    files = files_for({0: 12, 1: 12})
    copies = [ImageFile(Path(f"/data/c1/copy-{i}.png"), 1, f.digest) for i, f in enumerate(files[:12])]
    for seed in range(10):
        kept, held = stratified_holdout(files + copies, 0.3, seed=seed)
        assert not {f.digest for f in kept} & {f.digest for f in held}, seed
        assert 0 < sum(f.label == 1 for f in held) < 24  # class 1 still holds out some, keeps some
    assert stratified_holdout(files, 0.3, seed=2) == stratified_holdout(files, 0.3, seed=2)


def test_a_class_keeps_its_own_image_for_training_next_to_copies_of_another_class():
    """Copies go where the first class put them; the image of its own is the one a class keeps, whatever the
    shuffle, or its training images could all be held out with the copies."""
    files = files_for({0: 12})
    own = ImageFile(Path("/data/c1/own.png"), 1, "own")
    copies = [ImageFile(Path(f"/data/c1/copy-{i}.png"), 1, f.digest) for i, f in enumerate(files)]
    for seed in range(20):
        kept, held = stratified_holdout(files + copies + [own], 0.3, seed=seed)
        assert own in kept, seed


def test_the_seeded_shuffle_holds_out_what_runs_begun_before_content_hashes_did():
    """The split of every data set measured before content hashes: 3 classes, one pair of copies within a class.
    A resume of such a run's state must hold out these very files, or it is refused."""
    kept, held = stratified_holdout(files_for({0: 8, 1: 6, 2: 5}, duplicates=1), 0.3, seed=1,
                                    held_out_by=SEEDED_SHUFFLE)
    assert [str(f.path) for f in held] == HELD_BEFORE


# what the holdout gave before copies across classes were kept together (591a224), and until content hashes
HELD_BEFORE = ["/data/c0/004.png", "/data/c0/007.png", "/data/c1/000.png", "/data/c1/001.png", "/data/c2/003.png",
               "/data/c2/004.png"]


def added(files: list[ImageFile], label: int, name: str) -> list[ImageFile]:
    return files + [ImageFile(Path(f"/data/c{label}/{name}.png"), label, f"{label}-new-{name}")]


@pytest.mark.parametrize("fraction, seed", [(0.2, 0), (0.1, 0), (0.1, 1), (0.25, 7)])  # the test split's, then val's
def test_an_image_added_to_a_class_moves_at_most_one_held_out_image_to_training(fraction, seed):
    """A data set's v2 with one more image in a class holds out what v1 did, but for at most one image that the
    new one displaces (or none, where the class's share grows by one): runs on the two are scored alike."""
    for n in range(3, 41):
        files = files_for({0: n, 1: 9})
        _, held = stratified_holdout(files, fraction, seed)
        _, held_now = stratified_holdout(added(files, 0, "new"), fraction, seed)
        moved = set(paths(held)) - set(paths(held_now))
        assert len(moved) <= 1, (n, sorted(moved))
        assert [f for f in held if f.label == 1] == [f for f in held_now if f.label == 1]  # other classes stay put


def test_images_added_move_about_as_many_held_out_images():
    files = files_for({0: 100})
    more = files + [ImageFile(Path(f"/data/c0/new-{i}.png"), 0, f"new-{i}") for i in range(10)]
    for seed in range(5):  # the seeded shuffle moved 8 to 13 of the 20
        _, held = stratified_holdout(files, 0.2, seed)
        _, held_now = stratified_holdout(more, 0.2, seed)
        assert len(set(paths(held)) - set(paths(held_now))) <= 10, seed


def test_a_renamed_or_moved_file_keeps_its_side():
    """The order goes by content, not by name: a file renamed (here to sort last in its class), or a class's
    files moved into a subfolder, holds out the same images."""
    files = files_for({0: 30, 1: 30}, duplicates=4)
    renamed = [ImageFile(Path("/data/c0/zz-renamed.png"), 0, files[8].digest), *files[:8], *files[9:]]
    moved = [ImageFile(Path(f"/data/c{f.label}/sub/{f.path.name}"), f.label, f.digest) for f in files]
    for seed in range(5):
        digests = [{f.digest for f in side} for side in stratified_holdout(files, 0.3, seed)]
        assert digests == [{f.digest for f in side} for side in stratified_holdout(renamed, 0.3, seed)], seed
        assert digests == [{f.digest for f in side} for side in stratified_holdout(moved, 0.3, seed)], seed


@pytest.mark.parametrize("held_out_by", [CONTENT_HASH, SEEDED_SHUFFLE])
def test_each_class_holds_out_its_exact_share(held_out_by):
    counts = {0: 20, 1: 40, 2: 10, 3: 7, 4: 2, 5: 1}
    for fraction in (0.1, 0.2, 0.5):
        _, held = stratified_holdout(files_for(counts), fraction, seed=5, held_out_by=held_out_by)
        expected = {label: min(max(1, round(fraction * n)), n - 1) for label, n in counts.items()}
        assert Counter(f.label for f in held) == Counter({label: k for label, k in expected.items() if k})


def test_every_class_keeps_training_images_even_at_high_fractions():
    kept, held = stratified_holdout(files_for({0: 2, 1: 3, 2: 1}), 0.9, seed=0)
    assert {f.label for f in kept} == {0, 1, 2}
    assert held  # something is still held out


def test_tiny_fraction_may_hold_out_nothing_but_never_loses_files():
    files = files_for({0: 3, 1: 3})
    kept, held = stratified_holdout(files, 0.1, seed=0)
    assert len(kept) + len(held) == len(files)


def test_results_are_sorted_by_path():
    kept, held = stratified_holdout(files_for({0: 12, 1: 12}), 0.25, seed=1)
    assert paths(kept) == sorted(paths(kept), key=str)
    assert paths(held) == sorted(paths(held), key=str)


def test_find_leaks_reports_identical_files_in_two_splits():
    a = ImageFile(Path("/d/train/n0/a.png"), 0, "same")
    b = ImageFile(Path("/d/val/n0/b.png"), 0, "same")
    c = ImageFile(Path("/d/val/n1/c.png"), 1, "other")
    assert find_leaks({"train": [a], "val": [b, c], "test": []}) == [(a.path, b.path)]


def test_find_leaks_ignores_duplicates_within_one_split():
    a = ImageFile(Path("/d/train/a.png"), 0, "same")
    b = ImageFile(Path("/d/train/b.png"), 0, "same")
    assert find_leaks({"train": [a, b], "test": [ImageFile(Path("/d/test/c.png"), 0, "x")]}) == []


def test_find_leaks_reports_each_leaked_copy():
    train = [ImageFile(Path("/d/train/a.png"), 0, "dup")]
    val = [ImageFile(Path("/d/val/b.png"), 0, "dup")]
    test = [ImageFile(Path("/d/test/c.png"), 0, "dup")]
    leaks = find_leaks({"train": train, "val": val, "test": test})
    assert {pair[1] for pair in leaks} == {Path("/d/val/b.png"), Path("/d/test/c.png")}


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_holdout_has_no_leaks_by_construction(fraction):
    files = files_for({0: 25, 1: 25, 2: 25}, duplicates=6)
    kept, held = stratified_holdout(files, fraction, seed=11)
    assert find_leaks({"train": kept, "val": held}) == []


def test_find_conflicts_pairs_each_copy_under_another_class_with_the_first():
    a = ImageFile(Path("/d/train/a/x.png"), 0, "same")
    a_again = ImageFile(Path("/d/train/a/y.png"), 0, "same")
    b = ImageFile(Path("/d/train/b/x.png"), 1, "same")
    c = ImageFile(Path("/d/train/c/x.png"), 2, "same")
    other = ImageFile(Path("/d/train/b/z.png"), 1, "other")
    assert find_conflicts({"train": [c, other, b, a_again, a], "test": []}) == [(a, b), (a, c)]


def test_find_conflicts_leaves_copies_in_two_splits_to_find_leaks():
    a = ImageFile(Path("/d/train/a/x.png"), 0, "same")
    b = ImageFile(Path("/d/test/b/x.png"), 1, "same")
    assert find_conflicts({"train": [a], "test": [b]}) == []
