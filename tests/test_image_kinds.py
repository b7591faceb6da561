"""The kinds of file a user's own image-folder data set holds, through the scan that training, inspect-data,
predict and evaluate share: every picture used as it looks, every bad file skipped with its reason (or fatal
under --strict-data), what an operating system leaves in folders passed over unseen."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monkeytrain.data import layout
from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.imagefiles import load_rgb
from monkeytrain.errors import UserError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def noise(size=(40, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def phone_portrait(path: Path) -> None:
    """Stored landscape, red left and blue right, with EXIF orientation 6: upright, red is on top."""
    pixels = np.zeros((30, 60, 3), np.uint8)
    pixels[:, :30], pixels[:, 30:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, "JPEG", exif=exif.tobytes())


def write_pictures(folder: Path) -> None:
    """One file of every kind that holds a picture, under the names real data sets give them."""
    noise().convert("CMYK").save(folder / "cmyk.jpg")
    noise().convert("L").save(folder / "grey.png")
    Image.fromarray(np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40).save(folder / "grey16.png")
    noise().convert("1").save(folder / "onebit.png")
    noise().convert("P", palette=Image.ADAPTIVE, colors=8).save(folder / "palette.png", transparency=0)
    noise().convert("RGBA").save(folder / "rgba.png")
    noise().convert("LA").save(folder / "la.png")
    frames = [Image.new("RGB", (40, 40), colour) for colour in (RED, GREEN, BLUE)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(folder / "pages.tif", save_all=True, append_images=frames[1:])
    noise().save(folder / "photo.webp")
    noise().save(folder / "photo.bmp")
    phone_portrait(folder / "portrait.jpg")
    noise((8, 8)).save(folder / "tiny.png")
    noise((4000, 100)).save(folder / "panorama.jpg")
    for name, fmt in (("UPPER.JPG", "JPEG"), ("UPPER.JPEG", "JPEG"), ("Mixed.Png", "PNG"), ("web.jfif", "JPEG"),
                      ("n9151jpg", "JPEG")):
        noise(seed=len(name)).save(folder / name, fmt)
    (folder / "deeper" / "deepest").mkdir(parents=True)
    noise(seed=9).save(folder / "deeper" / "deepest" / "nested.png")
    noise(seed=10).save(folder.parent.parent / "elsewhere.png")
    (folder / "link.png").symlink_to(folder.parent.parent / "elsewhere.png")


PICTURES = {"cmyk.jpg", "grey.png", "grey16.png", "onebit.png", "palette.png", "rgba.png", "la.png", "animated.gif",
            "pages.tif", "photo.webp", "photo.bmp", "portrait.jpg", "tiny.png", "panorama.jpg", "UPPER.JPG",
            "UPPER.JPEG", "Mixed.Png", "web.jfif", "n9151jpg", "deeper/deepest/nested.png", "link.png"}


def write_system_files(folder: Path) -> None:
    """What macOS, Windows (WSL too), Google Drive and a NAS leave in a class folder and beside it."""
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(100))
    (folder / "._portrait.jpg").write_bytes(b"\0\5\26\7\0\2\0\0Mac OS X        " + bytes(60))
    (folder / "Thumbs.db").write_bytes(bytes.fromhex("d0cf11e0a1b11ae1") + bytes(500))
    (folder / "desktop.ini").write_text("[.ShellClassInfo]\nIconResource=C:\\icon.ico,0\n")
    (folder / "Icon\r").write_bytes(b"")
    (folder / "portrait.jpg:Zone.Identifier").write_text("[ZoneTransfer]\r\nZoneId=3\r\n")  # copied into WSL
    (folder / "@eaDir" / "portrait.jpg").mkdir(parents=True)  # a Synology NAS's thumbnails of each image
    noise().save(folder / "@eaDir" / "portrait.jpg" / "SYNOPHOTO_THUMB_M.jpg")
    for top_of_a_drive in ("System Volume Information", "$RECYCLE.BIN"):
        (folder.parent / top_of_a_drive).mkdir()


def write_bad_files(folder: Path) -> None:
    (folder / "empty.jpg").write_bytes(b"")
    whole = io.BytesIO()
    noise().save(whole, "JPEG")
    (folder / "truncated.jpg").write_bytes(whole.getvalue()[:300])
    (folder / "notes.jpg").write_text("not a picture\n")
    (folder / "scraped.jpg").write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>\n")
    (folder / "gone.jpg").symlink_to("deleted.jpg")
    (folder / "loop.jpg").symlink_to("loop.jpg")


BAD_FILES = {"empty.jpg": "an empty file", "truncated.jpg": "a damaged or truncated image",
             "notes.jpg": "not an image", "scraped.jpg": "an HTML page", "gone.jpg": "which does not exist",
             "loop.jpg": "a loop of links"}


@pytest.fixture
def own_data(tmp_path) -> Path:
    """A folder of class subfolders named with a space, accents and a dot: plain images in each, and
    every kind of picture and system file in the first."""
    root = tmp_path / "data"
    for seed, name in enumerate(("class one", "ünïcødé", "v1.2")):
        (root / name).mkdir(parents=True)
        for i in range(5):
            noise(seed=100 * seed + i + 20).save(root / name / f"plain{i}.png")
    write_pictures(root / "class one")
    write_system_files(root / "class one")
    return root


def used_files(root: Path, strict: bool) -> tuple[list[str], set[str], dict[str, str]]:
    """(class folders, files used of the first class relative to it, the reasons files were skipped)."""
    splits = discover_splits(layout.folders_from_root(root), 0.1, 0, strict)
    first = root / splits.class_folders[0]
    used = {f.path.relative_to(first).as_posix() for f in splits.train + splits.val + splits.test if f.label == 0}
    return splits.class_folders, used, {s.path.name: s.reason for s in splits.skipped}


def test_every_kind_of_picture_is_used_and_system_files_pass_strict_data(own_data):
    classes, used, skipped = used_files(own_data, strict=True)
    assert classes == ["class one", "v1.2", "ünïcødé"]
    assert used == PICTURES | {f"plain{i}.png" for i in range(5)}
    assert skipped == {}


def test_every_bad_file_is_skipped_with_its_reason_and_fails_strict_data(own_data):
    write_bad_files(own_data / "ünïcødé")
    _, used, skipped = used_files(own_data, strict=False)
    assert used == PICTURES | {f"plain{i}.png" for i in range(5)}
    assert set(skipped) == set(BAD_FILES)
    assert all(BAD_FILES[name] in reason for name, reason in skipped.items()), skipped
    with pytest.raises(UserError, match=f"{len(BAD_FILES)} bad file"):
        used_files(own_data, strict=True)


def test_pictures_decode_as_they_look(own_data):
    folder = own_data / "class one"
    portrait = np.asarray(load_rgb(folder / "portrait.jpg"))
    assert portrait.shape == (60, 30, 3)  # turned upright, as a phone shows it
    assert portrait[2, 15].tolist() == pytest.approx(list(RED), abs=8)  # red on top
    assert portrait[-3, 15].tolist() == pytest.approx(list(BLUE), abs=8)
    for first_frame_of in ("animated.gif", "pages.tif"):
        assert tuple(np.asarray(load_rgb(folder / first_frame_of))[20, 20]) == RED
    assert load_rgb(folder / "tiny.png").size == (8, 8)
    assert load_rgb(folder / "panorama.jpg").size == (4000, 100)
