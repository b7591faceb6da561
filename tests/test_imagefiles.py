"""monkeytrain.data.imagefiles: content-based detection, decoding to RGB, scanning."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import PIL.ImageFile
import pytest
from PIL import Image

from conftest import a_finished_run
from monkeytrain.data import imagefiles
from monkeytrain.data.imagefiles import (
    ImageFile, SkippedFile, candidate_files, check_image_bytes, load_rgb, oversized_warning,
    scan_labelled_files, to_rgb,
)


def encoded(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def noise_image(size=(32, 24), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# --- detection by content -------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
def test_complete_images_of_common_formats_pass(fmt):
    assert check_image_bytes(encoded(noise_image(), fmt)) is None


def test_empty_file_is_reported_as_empty():
    assert "empty" in check_image_bytes(b"")


def test_text_file_is_reported_as_not_an_image():
    reason = check_image_bytes(b"Label, Latin Name\nn0, alouatta\n")
    assert reason is not None and "not an image" in reason


@pytest.mark.parametrize("page", [b"<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>",
                                  b"\xef\xbb\xbf\r\n  <HTML><head><title>Not Found</title></head></HTML>"])
def test_an_html_page_saved_as_an_image_is_named_as_such(page):
    assert check_image_bytes(page).startswith("an HTML page, not an image")  # as a failed download saves


def test_an_iphones_heic_photo_is_named_as_such_with_what_to_do():
    heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64)  # the first box of a photo an iPhone takes
    assert check_image_bytes(heic) == "a HEIC image, which this Pillow cannot read; convert it to JPEG or PNG"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_reported_as_damaged(fmt):
    data = encoded(noise_image(), fmt)
    reason = check_image_bytes(data[: len(data) // 2])
    assert reason is not None and "truncated" in reason


def test_png_with_corrupt_pixel_data_is_reported_as_damaged():
    data = bytearray(encoded(noise_image((64, 64)), "PNG"))
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # zero out part of the compressed stream
    reason = check_image_bytes(bytes(data))
    assert reason is not None and "damaged" in reason


def test_image_header_followed_by_garbage_is_not_accepted():
    data = encoded(noise_image(), "PNG")[:33] + b"garbage" * 10
    assert check_image_bytes(data) is not None


# --- decoding to 8-bit RGB ------------------------------------------------------------

def pixel(image: Image.Image, xy=(0, 0)) -> tuple:
    assert image.mode == "RGB"
    return tuple(int(v) for v in image.getpixel(xy))


def test_grey_l_becomes_equal_rgb_channels():
    assert pixel(to_rgb(Image.new("L", (3, 3), 100))) == (100, 100, 100)


def test_rgb_is_returned_unchanged():
    image = noise_image()
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image))


def test_rgba_is_composited_over_white():
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue
    rgb = to_rgb(image)
    assert pixel(rgb, (0, 0)) == (255, 255, 255)
    assert pixel(rgb, (1, 0)) == (0, 0, 255)


def test_half_transparent_black_over_white_is_mid_grey():
    grey = pixel(to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 128))))
    assert all(abs(v - 127) <= 1 for v in grey)


def test_palette_image_with_transparency_composites_over_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # index 0 black, 1 red
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    reloaded = Image.open(io.BytesIO(encoded(image, "PNG", transparency=0)))
    assert reloaded.mode == "P" and "transparency" in reloaded.info
    rgb = to_rgb(reloaded)
    assert pixel(rgb, (0, 0)) == (255, 255, 255)  # transparent black shows the white background
    assert pixel(rgb, (1, 0)) == (255, 0, 0)


def test_palette_image_without_transparency_keeps_its_colours():
    image = Image.new("P", (1, 1))
    image.putpalette([10, 200, 30] + [0] * (256 * 3 - 3))
    assert pixel(to_rgb(image)) == (10, 200, 30)


def test_cmyk_becomes_rgb():
    assert pixel(to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0)))) == (255, 255, 255)
    assert pixel(to_rgb(Image.new("CMYK", (1, 1), (255, 0, 0, 0)))) == (0, 255, 255)
    assert pixel(to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 255)))) == (0, 0, 0)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257, 30000, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    rgb = np.asarray(to_rgb(image)).astype(int)
    expected = values[0] / 65535 * 255
    assert np.all(np.abs(rgb[0, :, 0] - expected) <= 1), rgb[0, :, 0]
    assert np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2])


def test_sixteen_bit_png_file_loads_scaled(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 20000, dtype=np.uint16)).save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    assert abs(pixel(rgb)[0] - 20000 / 65535 * 255) <= 1  # clipping would give 255


@pytest.mark.parametrize("suffix, dtype", [(".png", np.uint16), (".tif", np.uint16), (".tif", ">u2")])
def test_a_16_bit_file_of_8_bit_values_decodes_as_its_8_bit_twin(tmp_path, suffix, dtype):
    """A uint16 array of 0..251 saved as it is (MNIST-like, microscopy data): divided by 65535 it was all black."""
    values = np.arange(252).reshape(12, 21)
    sixteen, eight = tmp_path / f"sixteen{suffix}", tmp_path / "eight.png"
    Image.fromarray(values.astype(dtype)).save(sixteen)
    Image.fromarray(values.astype(np.uint8)).save(eight)
    with Image.open(sixteen) as image:
        assert image.mode in ("I;16", "I;16B")
    assert np.array_equal(np.asarray(load_rgb(sixteen)), np.asarray(load_rgb(eight)))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_every_16_bit_mode_is_read_by_its_value_range(mode):
    image = Image.new(mode, (3, 1))
    for x, value in enumerate((0, 128, 255)):
        image.putpixel((x, 0), value)
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 128, 255]


def test_12_bit_data_keeps_its_levels_scaled_to_8_bits(tmp_path):
    path = tmp_path / "twelve.png"
    values = np.arange(4096).reshape(64, 64)
    Image.fromarray(values.astype(np.uint16)).save(path)
    grey = np.asarray(load_rgb(path))[..., 0]
    assert np.array_equal(grey, values * 255 // 4095)  # all 256 levels (16 when divided by 65535)


def grey_tiff(tmp_path, values, mode: str) -> Path:
    """A 40 x 48 TIFF written by Pillow: `values` along the first row, the rest of the image 0."""
    pixels = np.zeros((40, 48), dtype=np.float32 if mode == "F" else np.int32)
    pixels[0, :len(values)] = values
    path = tmp_path / f"grey-{mode}.tif"
    Image.fromarray(pixels, mode).save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode
    return path


@pytest.mark.parametrize("values, expected", [
    ([0.25, 0.5, 1.0], [63, 127, 255]),  # 0..1: normalised
    ([64, 128.5, 255], [64, 128, 255]),  # 0..255: 8-bit values
    ([-1, 1, 3], [0, 127, 255]),  # neither: the image's own range
    ([np.nan, 0.5, 1.0], [0, 127, 255]),  # a missing value shows black and leaves the range alone
])
def test_float_tiff_is_read_by_its_value_range(tmp_path, values, expected):
    rgb = np.asarray(load_rgb(grey_tiff(tmp_path, values, "F")))
    assert rgb[0, :len(values), 0].tolist() == expected
    assert np.all(rgb[..., 0] == rgb[..., 2])


# One rule for 16-bit (I;16, a PNG) and 32-bit (I, a TIFF) integer images: the smallest white that holds them all.
INTEGER_RANGES = [
    ([1, 128, 255], [1, 128, 255]),  # 0..255: 8-bit data
    ([4, 512, 1023], [0, 127, 255]),  # 10-bit
    ([16, 2048, 4095], [0, 127, 255]),  # 12-bit
    ([64, 8192, 16383], [0, 127, 255]),  # 14-bit
    ([257, 30840, 65535], [1, 120, 255]),  # 0..65535: 16-bit data
    ([257, 4096, 16384], [1, 15, 63]),  # past 14 bits: a dark 16-bit image stays dark
]


@pytest.mark.parametrize("values, expected", INTEGER_RANGES)
def test_16_bit_integer_png_is_read_by_its_value_range(tmp_path, values, expected):
    path = tmp_path / "grey.png"
    pixels = np.zeros((40, 48), dtype=np.uint16)
    pixels[0, :len(values)] = values
    Image.fromarray(pixels).save(path)
    assert np.asarray(load_rgb(path))[0, :len(values), 0].tolist() == expected


@pytest.mark.parametrize("values, expected", [
    *INTEGER_RANGES,
    ([1 << 20, 1 << 23, (1 << 24) - 1], [15, 127, 255]),  # beyond 16 bits: the next even depth (24)
    ([1 << 20, 1 << 23, 1 << 24], [3, 31, 63]),  # 2 ** 24 needs 25 bits: read at 26
    ([0, 1 << 30, (1 << 31) - 1], [0, 127, 255]),  # the mode's largest: 31 bits
])
def test_32_bit_integer_tiff_is_read_by_its_value_range(tmp_path, values, expected):
    rgb = np.asarray(load_rgb(grey_tiff(tmp_path, values, "I")))
    assert rgb[0, :len(values), 0].tolist() == expected


@pytest.mark.parametrize("maxval, values, expected", [
    (65535, [1, 128, 255], [0, 0, 0]),  # dark 16-bit data (all below 256) stays dark, not 8-bit
    (1023, [4, 512, 1023], [0, 127, 255]),  # a 10-bit PGM: Pillow scales it to 0..65535
])
def test_a_pgm_of_more_than_8_bits_is_16_bit_data_however_dark(tmp_path, maxval, values, expected):
    path = tmp_path / "grey.pgm"
    path.write_bytes(f"P5\n3 1\n{maxval}\n".encode() + np.array(values, dtype=">u2").tobytes())
    assert np.asarray(load_rgb(path))[0, :, 0].tolist() == expected


def test_cache_keys_change_with_the_decoding(monkeypatch):
    """Views and statistics stored from images decoded otherwise (float images as black) are not reused."""
    files = [ImageFile(Path("/d/a.tif"), 0, "x")]
    before = imagefiles.content_key("views", files)
    monkeypatch.setattr(imagefiles, "DECODING_VERSION", imagefiles.DECODING_VERSION + 1)
    assert imagefiles.content_key("views", files) != before


def test_one_bit_and_la_modes_become_rgb():
    assert pixel(to_rgb(Image.new("1", (1, 1), 1))) == (255, 255, 255)
    assert pixel(to_rgb(Image.new("LA", (1, 1), (0, 0)))) == (255, 255, 255)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    image.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    loaded = load_rgb(path)
    assert loaded.size == (20, 40)
    # 6 turns the image clockwise (left half ends on top), 8 anticlockwise (on the bottom)
    top, bottom = pixel(loaded, (10, 5))[0], pixel(loaded, (10, 35))[0]
    assert (top > 200 and bottom < 50) if orientation == 6 else (top < 50 and bottom > 200)


def damaged_exif(orientation: int) -> bytes:
    """An EXIF block with an orientation and an XResolution stored as text (it is a rational): Pillow
    reads it, and raises when it writes the block back, as turning the image does."""
    entries = [struct.pack("<HHIH2x", 0x0112, 3, 1, orientation), struct.pack("<HHI4s", 0x011A, 2, 3, b"ab")]
    return b"Exif\0\0II*\0" + struct.pack("<IH", 8, len(entries)) + b"".join(entries) + struct.pack("<I", 0)


def test_an_image_with_a_damaged_exif_block_passes_the_scan_and_loads_as_stored(tmp_path):
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (40, 20)).save(path, "JPEG", exif=damaged_exif(6))
    [image], skipped = scan_labelled_files([(path, 0)])
    assert skipped == [] and load_rgb(path).size == (40, 20)  # its orientation cannot be read: as stored


def test_an_unreadable_file_is_skipped_with_the_reason(tmp_path, monkeypatch):
    path = tmp_path / "locked.png"
    path.write_bytes(encoded(noise_image(), "PNG"))
    original = Path.read_bytes

    def read_bytes(self):
        if self == path:  # as for a file without read permission (the tests may run as root)
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert scan_labelled_files([(path, 0)]) == ([], [SkippedFile(path, "unreadable (Permission denied)")])


def test_an_image_over_pillows_bomb_limit_is_too_large_not_damaged(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # refused from twice that: 200 pixels
    problem = check_image_bytes(encoded(noise_image((20, 20)), "PNG"))
    assert problem.startswith("too large for Pillow to decode") and "damaged" not in problem


def test_image_without_orientation_keeps_its_size(tmp_path):
    path = tmp_path / "plain.jpg"
    Image.new("RGB", (40, 20)).save(path)
    assert load_rgb(path).size == (40, 20)


# --- finding and scanning files -------------------------------------------------------

def test_candidate_files_skip_hidden_files_and_folders(tmp_path):
    for relative in ("b.png", "a.jpg", "sub/c", ".DS_Store", ".hidden/d.png", "sub/.e.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in candidate_files(tmp_path)]
    assert found == ["a.jpg", "b.png", "sub/c"]


def test_a_run_inside_a_class_named_runs_is_passed_over_by_the_scan(tmp_path, make_image_folder, capsys):
    """A class really named runs, trained with `--data .` and the default --output-dir, holds the run's folder."""
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=2)
    ended = a_finished_run(root / "n1" / "20261203-174800")
    shutil.copy(root / "n0" / "n0_000.png", ended / "curves.png")
    (root / "n1" / "runs" / "exp1" / "20261203-180000").mkdir(parents=True)  # --output-dir n1/runs/exp1
    (root / "n1" / "runs" / "exp1" / "20261203-180000" / ".in-use").write_text("1234\n")
    assert [path.name for path in candidate_files(root / "n1")] == ["n1_000.png", "n1_001.png"]
    warned = capsys.readouterr().err
    assert warned.count(f"warning: {ended} is passed over") == 1
    assert warned.count(f"warning: {root / 'n1' / 'runs'} is passed over") == 1


def test_candidate_files_skip_what_operating_systems_leave_in_folders_in_any_letter_case(tmp_path):
    for name in ("photo.jpg", "Thumbs.db", "thumbs.db", "ehthumbs.db", "desktop.ini", "Desktop.ini", "Icon\r", "Icon"):
        (tmp_path / name).write_bytes(b"x")
    assert [path.name for path in candidate_files(tmp_path)] == ["Icon", "photo.jpg"]  # plain Icon: a user's file


def test_candidate_files_skip_the_zone_identifier_marks_windows_leaves_beside_downloads_copied_into_wsl(tmp_path):
    for name in ("photo.jpg", "photo.jpg:Zone.Identifier", "scan.png:zone.identifier", "shot.jpg\uf03aZone.Identifier"):
        (tmp_path / name).write_text("[ZoneTransfer]\r\nZoneId=3\r\n")
    assert [path.name for path in candidate_files(tmp_path)] == ["photo.jpg"]


def test_an_icloud_placeholder_of_an_image_is_skipped_with_what_to_do_not_passed_over_as_a_dot_file(tmp_path):
    """A Mac that optimises its storage leaves .IMG_2.JPG.icloud for a photo it has not kept: passed over unseen
    as a dot file, the class trained on what was left of it without a word."""
    noise_image().save(tmp_path / "IMG_1.JPG", "JPEG")
    (tmp_path / ".IMG_2.JPG.icloud").write_bytes(b"bplist00\xd3\x01\x02\x03")
    (tmp_path / "..DS_Store.icloud").write_bytes(b"bplist00")
    assert [path.name for path in candidate_files(tmp_path)] == [".IMG_2.JPG.icloud", "IMG_1.JPG"]
    for check in (scan_labelled_files, imagefiles.glance_at_files):
        images, skipped = check([(path, 0) for path in candidate_files(tmp_path)])
        assert [image.path.name for image in images] == ["IMG_1.JPG"]
        assert [bad.reason.split(";")[0] for bad in skipped] == [
            "an iCloud Drive placeholder of IMG_2.JPG, which this Mac has not downloaded"]


def test_candidate_files_skip_the_thumbnails_a_synology_nas_keeps_beside_the_images(tmp_path):
    (tmp_path / "@eaDir" / "photo.jpg").mkdir(parents=True)
    for relative in ("photo.jpg", "@eaDir/photo.jpg/SYNOPHOTO_THUMB_XL.jpg", "@eaDir/photo.jpg/SYNOPHOTO_THUMB_S.jpg"):
        noise_image().save(tmp_path / relative, "JPEG")
    assert candidate_files(tmp_path) == [tmp_path / "photo.jpg"]


def test_a_folder_that_cannot_be_listed_is_reported_not_passed_over(tmp_path, monkeypatch):
    locked = tmp_path / "class" / "locked"
    locked.mkdir(parents=True)
    for path in (tmp_path / "class" / "open.png", locked / "hidden_from_us.png"):
        path.write_bytes(encoded(noise_image(), "PNG"))
    scandir, listdir = os.scandir, os.listdir

    def no_permission(listing):  # as for a folder without read permission (the tests may run as root)
        def refuse(path="."):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return listing(path)
        return refuse

    monkeypatch.setattr(os, "scandir", no_permission(scandir))
    monkeypatch.setattr(os, "listdir", no_permission(listdir))
    images, skipped = scan_labelled_files([(path, 0) for path in candidate_files(tmp_path / "class")])
    assert [image.path.name for image in images] == ["open.png"]
    assert skipped == [SkippedFile(locked, "a folder that cannot be listed (Permission denied); the images in it "
                                           "are left out")]


def test_a_link_that_leads_back_to_itself_is_reported_as_a_loop(tmp_path):
    (tmp_path / "a.jpg").symlink_to("b.jpg")
    (tmp_path / "b.jpg").symlink_to("a.jpg")
    images, skipped = scan_labelled_files([(path, 0) for path in candidate_files(tmp_path)])
    assert images == [] and skipped == [
        SkippedFile(tmp_path / "a.jpg", "a link to b.jpg that leads back round to itself (a loop of links)"),
        SkippedFile(tmp_path / "b.jpg", "a link to a.jpg that leads back round to itself (a loop of links)")]


def test_candidate_files_follow_linked_folders_once_and_keep_broken_links_to_report(tmp_path):
    elsewhere, folder = tmp_path / "elsewhere", tmp_path / "class"
    for relative in ("elsewhere/far.png", "class/near.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(encoded(noise_image(), "PNG"))
    (folder / "more").symlink_to(elsewhere)  # a folder of links: followed
    (folder / "loop").symlink_to(folder)     # back to itself: not followed, no loop
    (folder / "up").symlink_to(tmp_path)     # to the split holding it: not followed, no other class's images
    (folder / "more" / "back").symlink_to(folder / "more")  # elsewhere, to itself: walked once
    (folder / "gone.png").symlink_to(tmp_path / "deleted.png")
    os.mkfifo(folder / "pipe")               # reading it would block for good
    found = [p.relative_to(folder).as_posix() for p in candidate_files(folder)]
    assert found == ["gone.png", "more/far.png", "near.png"]
    images, skipped = scan_labelled_files([(path, 0) for path in candidate_files(folder)])
    assert [image.path.name for image in images] == ["far.png", "near.png"]
    assert skipped == [SkippedFile(folder / "gone.png", f"a link to {tmp_path / 'deleted.png'}, which does not exist")]


def test_hidden_parent_of_the_scanned_folder_does_not_hide_everything(tmp_path):
    folder = tmp_path / ".cache" / "class"
    folder.mkdir(parents=True)
    (folder / "img.png").write_bytes(b"x")
    assert candidate_files(folder) == [folder / "img.png"]


def test_scan_judges_files_by_content_not_name(tmp_path):
    jpeg_without_extension = tmp_path / "photo"
    jpeg_without_extension.write_bytes(encoded(noise_image(seed=1), "JPEG"))
    png = tmp_path / "b.png"
    png.write_bytes(encoded(noise_image(seed=2), "PNG"))
    text_named_jpg = tmp_path / "notes.jpg"
    text_named_jpg.write_text("just text")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(encoded(noise_image(seed=3), "JPEG")[:200])

    images, skipped = scan_labelled_files(
        [(jpeg_without_extension, 0), (png, 1), (text_named_jpg, 0), (empty, 1), (truncated, 0)])

    assert images == [
        ImageFile(jpeg_without_extension, 0, hashlib.sha1(jpeg_without_extension.read_bytes()).hexdigest(), 32 * 24),
        ImageFile(png, 1, hashlib.sha1(png.read_bytes()).hexdigest(), 32 * 24),
    ]
    reasons = {s.path.name: s.reason for s in skipped}
    assert set(reasons) == {"notes.jpg", "empty.png", "cut.jpg"}
    assert "not an image" in reasons["notes.jpg"]
    assert "empty" in reasons["empty.png"]
    assert "truncated" in reasons["cut.jpg"]
    assert all(isinstance(s, SkippedFile) for s in skipped)


def test_scan_keeps_input_order_and_labels(tmp_path):
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i:02d}.png")
        paths[-1].write_bytes(encoded(noise_image((8, 8), seed=i), "PNG"))
    labelled = [(p, i % 3) for i, p in enumerate(reversed(paths))]
    images, skipped = scan_labelled_files(labelled)
    assert skipped == []
    assert [(f.path, f.label) for f in images] == labelled


def test_identical_bytes_give_identical_digests(tmp_path):
    data = encoded(noise_image(), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "b.png").write_bytes(data)
    (tmp_path / "c.png").write_bytes(encoded(noise_image(seed=9), "PNG"))
    images, _ = scan_labelled_files([(tmp_path / n, 0) for n in ("a.png", "b.png", "c.png")])
    assert images[0].digest == images[1].digest != images[2].digest


# --- what earlier scans found ----------------------------------------------------------

@pytest.fixture
def scanned_folder(tmp_path, monkeypatch):
    """Two images and a damaged file, scanned once into a cache file: (labelled paths, cache file,
    what that scan found). Their change times are trusted, just written as they are (see RACY_NS)."""
    from monkeytrain.data import imagefiles

    monkeypatch.setattr(imagefiles, "RACY_NS", -10**12)
    labelled = []
    for i in range(2):
        labelled.append((tmp_path / f"{i}.png", i))
        labelled[-1][0].write_bytes(encoded(noise_image(seed=i), "PNG"))
    labelled.append((tmp_path / "cut.jpg", 0))
    labelled[-1][0].write_bytes(encoded(noise_image(seed=3), "JPEG")[:200])
    cache_file = tmp_path / "cache" / "scans.json"
    return labelled, cache_file, scan_labelled_files(labelled, cache_file)


def counting_inspections(monkeypatch) -> list[str]:
    from monkeytrain.data import imagefiles

    inspected, really_inspect = [], imagefiles.inspect
    monkeypatch.setattr(imagefiles, "inspect", lambda path, label: inspected.append(path.name)
                        or really_inspect(path, label))
    return inspected


def test_a_second_scan_reads_what_the_first_found_and_decodes_nothing(scanned_folder, monkeypatch):
    labelled, cache_file, first = scanned_folder
    inspected = counting_inspections(monkeypatch)
    relabelled = [(path, 5) for path, _ in labelled]  # labels come from the caller, not the cache
    images, skipped = scan_labelled_files(relabelled, cache_file)
    assert inspected == []
    assert images == [ImageFile(f.path, 5, f.digest, f.pixels) for f in first[0]] and skipped == first[1]
    assert "truncated" in skipped[0].reason


def test_a_changed_file_alone_is_scanned_again(scanned_folder, monkeypatch):
    labelled, cache_file, first = scanned_folder
    changed = labelled[1][0]
    changed.write_bytes(encoded(noise_image(seed=7), "PNG"))
    assert changed.stat().st_size == labelled[0][0].stat().st_size  # the same size: caught by its times,
    os.utime(changed, ns=(10**18, 10**18))  # which a tick of the file system's clock would not tell apart
    inspected = counting_inspections(monkeypatch)
    images, _ = scan_labelled_files(labelled, cache_file)
    assert inspected == ["1.png"]
    assert images[1].digest == hashlib.sha1(changed.read_bytes()).hexdigest() != first[0][1].digest
    assert scan_labelled_files(labelled, cache_file)[0] == images and inspected == ["1.png"]  # kept


def test_files_changed_just_before_a_scan_are_inspected_again_by_the_next(tmp_path, monkeypatch):
    path = tmp_path / "fresh.png"
    path.write_bytes(encoded(noise_image(), "PNG"))
    cache_file = tmp_path / "scans.json"
    first = scan_labelled_files([(path, 0)], cache_file)  # within RACY_NS of the write
    inspected = counting_inspections(monkeypatch)
    assert scan_labelled_files([(path, 0)], cache_file) == first and inspected == ["fresh.png"]


def test_a_damaged_scan_cache_is_scanned_over(scanned_folder, monkeypatch):
    labelled, cache_file, first = scanned_folder
    cache_file.write_text('{"header": ')
    inspected = counting_inspections(monkeypatch)
    assert scan_labelled_files(labelled, cache_file) == first
    assert sorted(inspected) == ["0.png", "1.png", "cut.jpg"]  # in the order the scan's threads took them
    assert scan_labelled_files(labelled, cache_file) == first and len(inspected) == 3  # written anew


def test_load_rgb_decodes_a_grey_jpeg_without_extension(tmp_path):
    path = tmp_path / "grey"
    Image.new("L", (5, 7), 90).save(path, "JPEG")
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == (5, 7)
    assert all(abs(v - 90) <= 2 for v in pixel(loaded))


# --- large images ---------------------------------------------------------------------

def test_a_large_jpeg_decodes_at_reduced_scale_when_a_small_side_is_wanted(tmp_path):
    path = tmp_path / "large.jpg"
    path.write_bytes(encoded(noise_image((1024, 768)).resize((1024, 768)), "JPEG"))
    assert load_rgb(path).size == (1024, 768)
    reduced = load_rgb(path, min_side=64)
    # draft mode: a power-of-two scale that keeps both sides at least twice the wanted side
    assert reduced.size == (256, 192) and min(reduced.size) >= 2 * 64
    assert load_rgb(path, min_side=400).size == (1024, 768)  # no smaller scale would keep 800 px


def test_the_scan_checks_a_large_jpeg_at_reduced_scale_and_keeps_its_stored_size(tmp_path, monkeypatch):
    """A folder of phone photos: each decoded whole at 24 megapixels took three times as long, and 72 MiB a thread."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(encoded(noise_image((60, 40)).resize((1200, 800)), "JPEG"))
    decoded_sizes, load = [], PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda image: decoded_sizes.append(image.size) or load(image))
    (image,), _ = scan_labelled_files([(path, 0)])
    assert decoded_sizes == [(150, 100)]  # 1/8 scale
    assert image.pixels == 1200 * 800 and image.elongation == 1.5


@pytest.mark.parametrize("progressive", [False, True])
def test_a_truncated_large_jpeg_is_still_found_damaged_at_reduced_scale(progressive):
    whole = encoded(noise_image((60, 40)).resize((1200, 800)), "JPEG", progressive=progressive)
    assert check_image_bytes(whole) is None
    assert "truncated" in check_image_bytes(whole[: len(whole) * 2 // 3])


def test_reduced_scale_decoding_gives_nearly_the_same_stored_view(tmp_path):
    from monkeytrain.data.views import stored_view_transform

    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((1024, 768), Image.BICUBIC)
    path = tmp_path / "photo.jpg"
    path.write_bytes(encoded(smooth, "JPEG", quality=95))
    transform = stored_view_transform(64)
    full = transform(load_rgb(path)).float()
    drafted = transform(load_rgb(path, min_side=73)).float()
    assert full.shape == drafted.shape == (3, 73, 73)
    assert (full - drafted).abs().mean() < 2.0  # grey levels out of 255


def test_an_oversized_image_is_used_and_flagged_without_a_python_warning(tmp_path, monkeypatch, recwarn):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands in for a 100-megapixel photo
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    big.write_bytes(encoded(noise_image((40, 40)), "PNG"))      # 1,600 pixels: over the threshold
    small.write_bytes(encoded(noise_image((20, 20)), "PNG"))    # 400 pixels
    images, skipped = scan_labelled_files([(big, 0), (small, 0)])
    assert skipped == [] and [image.oversized for image in images] == [True, False]
    assert images[0].pixels == 1600
    load_rgb(big)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "big.png is a very large image" in oversized_warning(images[0])


def test_a_glance_finds_what_a_scan_finds_but_damage_past_the_header(tmp_path):
    from test_image_kinds import write_bad_files

    write_bad_files(tmp_path)
    noise_image().save(tmp_path / "fine.png")
    (tmp_path / "cut.png").write_bytes(encoded(noise_image(), "PNG")[:200])  # its header whole, its pixels not
    labelled = [(path, 0) for path in candidate_files(tmp_path)]
    scanned, glanced = scan_labelled_files(labelled), imagefiles.glance_at_files(labelled)
    assert [image.path for image in glanced[0]] == [tmp_path / "cut.png", tmp_path / "fine.png"]
    assert glanced[1] == [bad for bad in scanned[1] if bad.path.name != "cut.png"] and len(glanced[1]) == 6
    assert glanced[0][1].pixels == scanned[0][0].pixels == 32 * 24
