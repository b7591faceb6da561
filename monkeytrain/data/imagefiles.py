"""Finding and decoding image files, judged by their content, never their names."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Optional

import numpy as np
import PIL
from PIL import Image, ImageOps, UnidentifiedImageError

from monkeytrain.data.passedover import is_hidden_folder, passed_over_as_runs
from monkeytrain.storage import mark_used, write_cache

# PIL raises these for files that are not images or are damaged; all mean "skip".
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# The white levels of an integer grey image (16-bit I;16*, 32-bit I), smallest first. The files do not say
# how many bits their values use, so an image is read at the smallest level that holds all its values: a
# 16-bit PNG of 0..255 (a uint16 array saved as it is, common for MNIST-like, microscopy and medical data)
# decodes exactly as its 8-bit twin, 10-, 12- and 14-bit data keep their levels, a 16-bit photograph is read
# at 65535, and a 32-bit image beyond 16 bits at the next even depth (up to 31, the mode's largest). The
# level is chosen per image, so a folder mixing depths (rare) could read a dark 12-bit frame as 10-bit.
INTEGER_WHITE_LEVELS = tuple(2 ** bits - 1 for bits in (*range(8, 31, 2), 31))
# Modes that Pillow does not scale to 8 bits itself (its own conversions clip) and the white levels of each. A
# float image of 0..1 is normalised and one of 0..255 holds 8-bit values.
WHITE_LEVELS = {**dict.fromkeys(("I;16", "I;16B", "I;16L", "I;16N", "I"), INTEGER_WHITE_LEVELS), "F": (1.0, 255)}
# Formats whose integer images always hold 16-bit data: Pillow reads a PGM of more than 8 bits as I, scaled to
# 0..65535 by the maxval its header gives, so a dark one must not be taken for 8-bit data.
SIXTEEN_BIT_FORMATS = ("PPM",)
# What the pixels of a file decode to, as to_rgb makes them. Part of every key made from files (views,
# statistics), so a change to it rebuilds what was stored: 2 reads 32-bit and float images by their
# values (1 made them black); 3 reads a dark 16-bit PGM as 16-bit; 4 reads 16-bit images by their values
# too (3 divided all by 65535: 0..255 black) and 32-bit ones beyond 16 bits by bit depth, not stretched.
DECODING_VERSION = 4
# Like Pillow's thumbnail(): a JPEG is decoded at reduced scale (draft mode) only
# down to twice the wanted size, so the antialiased resize after it keeps its quality.
DRAFT_REDUCING_GAP = 2
# The scan decodes a JPEG at 1/8 scale, the least its decoder offers: every byte is still decoded, so damage and
# truncation are found as at full size, for a third of the time and 1/64 of the memory (a 24-megapixel photo:
# 0.2 s, not 0.65 s, and 1 MiB, not 72 MiB, in each of SCAN_THREADS at once).
CHECK_SCALE = 8
# The brands an ISO media file of HEIF images names in its ftyp box, by what its users call it: "HEIC" for an
# iPhone's photos (its HEVC-coded kind), and AVIF, which only some builds of Pillow read.
HEIF_BRANDS = {**dict.fromkeys((b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"), "HEIC"),
               **dict.fromkeys((b"mif1", b"msf1"), "HEIF"), **dict.fromkeys((b"avif", b"avis"), "AVIF")}
# Files an operating system writes into folders for its own use, hidden where it made them: Windows' thumbnail
# caches and folder settings (Google Drive and network shares leave desktop.ini in every folder), and the
# custom-icon file "Icon\r" of a Mac folder. Passed over like dot files, as torchvision's ImageFolder passes
# over them by their extensions, never reported as bad images (nor fatal under --strict-data).
SYSTEM_FILES = frozenset({"thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "icon\r"})
# The ends of the names of Windows' "downloaded from the internet" marks, kept in an NTFS stream beside each file
# (photo.jpg:Zone.Identifier): copied into WSL's own file system, or off a drive that WSL shows with its ":" as
# U+F03A, each becomes a file of its own, one beside every downloaded image. Passed over as SYSTEM_FILES are.
ZONE_IDENTIFIER_ENDS = (":zone.identifier", "\uf03azone.identifier")
SCAN_THREADS = min(8, (os.cpu_count() or 1) * 2)  # more than the cores: a thread waits on the disk too



@dataclass(frozen=True)
class ImageFile:
    """One readable image: where it is, its class index and a digest of its bytes."""

    path: Path
    label: int
    digest: str
    pixels: int = 0  # width x height as stored
    # The longer side over the shorter (None: scanned before it was kept). Not part of equality: like
    # `pixels`, it follows from the content, which `digest` stands for.
    elongation: Optional[float] = field(default=None, compare=False)

    @property
    def oversized(self) -> bool:
        """Larger than Pillow's decompression-bomb threshold (about 89 megapixels)."""
        return self.pixels > (Image.MAX_IMAGE_PIXELS or float("inf"))


def oversized_warning(image: ImageFile) -> str:
    return (f"{image.path} is a very large image ({image.pixels / 1e6:.0f} megapixels); it is used, "
            "decoded at reduced size, but a smaller copy of it would load faster.")


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


def to_rgb(image: Image.Image, file_format: Optional[str] = None) -> Image.Image:
    """Any PIL mode (L, P, RGBA, CMYK, 16-bit, 32-bit, float, ...) as 8-bit RGB; alpha over white. The
    format of the file it came from (Pillow's name: "PPM") tells 16-bit data where the mode cannot."""
    if image.mode in WHITE_LEVELS:
        sixteen_bit = image.mode != "F" and file_format in SIXTEEN_BIT_FORMATS
        image = eight_bit_grey(image, (65535,) if sixteen_bit else WHITE_LEVELS[image.mode])
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def eight_bit_grey(image: Image.Image, white_levels: tuple[float, ...]) -> Image.Image:
    """A 16-bit, 32-bit or float grey image as mode L, black to the first of its white levels that holds
    all its values (see WHITE_LEVELS). Values no level holds (negative, or past the largest) are stretched
    from the image's own minimum to its maximum: the only scale such a file gives. Pixels that are not
    numbers (NaN, a float TIFF's mark for a missing value) show black rather than spoil the range."""
    pixels = np.asarray(image, dtype=np.float64)
    numbers = pixels[np.isfinite(pixels)]
    low, high = (numbers.min(), numbers.max()) if numbers.size else (0, 0)
    white = next((level for level in white_levels if low >= 0 and high <= level), None)
    black, white = (0, white) if white is not None else (low, high)
    scaled = (pixels - black) / (((white - black) or 1) / 255)
    return Image.fromarray(np.nan_to_num(np.clip(scaled, 0, 255), nan=0).astype(np.uint8), mode="L")


def quiet_pillow_size_warning() -> None:
    """Pillow warns about every image over MAX_IMAGE_PIXELS as a raw Python warning; the scan
    reports such files itself, one line each. Set before each use, as test runners and other
    libraries reset the warning filters (idempotent: the filter moves to the front)."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def load_rgb(path: Path, min_side: Optional[int] = None) -> Image.Image:
    """Decode an image file, apply its EXIF orientation and return it as RGB.

    With `min_side`, a large JPEG is decoded at a reduced scale (a power of two)
    that keeps both sides at least 2 * min_side: far faster, for a caller that
    resizes to min_side anyway.
    """
    quiet_pillow_size_warning()
    with Image.open(path) as image:
        if min_side:
            image.draft(None, (min_side * DRAFT_REDUCING_GAP, min_side * DRAFT_REDUCING_GAP))
        image.load()
        return to_rgb(upright(image), image.format)


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says, or as stored where its EXIF block is damaged: Pillow
    rewrites the block while turning, and raises on bad values in it (TypeError, struct.error, ...) that
    a decode of the pixels never reads."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # the pixels are whole (decoded above); only the orientation is lost
        return image


def check_image_bytes(data: bytes) -> Optional[str]:
    """None if `data` decodes completely as an image, else why it does not."""
    return decode_check(data)[0]


def decode_check(data: bytes) -> tuple[Optional[str], tuple[int, int]]:
    """(why `data` does not decode completely as an image, or None; its width and height, or (0, 0))."""
    return image_problem(io.BytesIO(data), data, decode=True)


def image_problem(source: BinaryIO, head: bytes, decode: bool) -> tuple[Optional[str], tuple[int, int]]:
    """(why the image in `source` does not open, or with `decode` does not decode completely, or None; its
    width and height, or (0, 0)). `head`, the file's first bytes, tells what a file that is no image holds."""
    if not head:
        return "an empty file", (0, 0)
    try:
        with Image.open(source) as image:
            size = image.size  # as stored: draft mode shrinks it
            if decode:
                image.draft(None, (max(1, size[0] // CHECK_SCALE), max(1, size[1] // CHECK_SCALE)))  # JPEG only
                image.load()  # a decode of every byte, so truncated files are caught here
            return None, size
    except UnidentifiedImageError:
        return unreadable_kind(head), (0, 0)
    except DECODE_ERRORS as error:
        return decode_failure(error), (0, 0)


def decode_failure(error: Exception) -> str:
    """Why an image that Pillow opened did not decode, in the scan's words."""
    if isinstance(error, Image.DecompressionBombError):  # Pillow's guard, at twice MAX_IMAGE_PIXELS: not damage
        return f"too large for Pillow to decode ({error}); use a smaller copy of it"
    if isinstance(error, OSError) and error.errno is not None:  # the system's: a file gone, a failing disk
        return f"unreadable ({error.strerror or error})"
    return f"a damaged or truncated image ({error})"


def unreadable_kind(data: bytes) -> str:
    """What a file Pillow cannot identify holds, where its first bytes tell a kind that image folders often
    hold: an iPhone's HEIC photos (an ISO media file whose brand says so), or the HTML page a failed
    download saves under the image's name."""
    if data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS:
        return f"a {HEIF_BRANDS[data[8:12]]} image, which this Pillow cannot read; convert it to JPEG or PNG"
    if data[:1024].removeprefix(b"\xef\xbb\xbf").lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page, not an image (what a failed download saves under the image's name)"
    return "not an image in any format Pillow reads"


def is_image_file(path: Path) -> bool:
    """Whether Pillow recognises the header of the regular file at `path` (no full decode: enough to tell a
    folder of images from a folder of folders, and cheap on a large one, which stops at its first image)."""
    if not path.is_file():  # a pipe or device would block the read
        return False
    quiet_pillow_size_warning()
    try:
        with Image.open(path):
            return True
    except DECODE_ERRORS:  # not an image, or unreadable: either way no sign of a class folder
        return False


def candidate_files(folder: Path) -> list[Path]:
    """Every regular file below `folder` but hidden ones (is_hidden_file, is_hidden_folder) and those in
    monkeytrain's own folders (passed_over_as_runs), sorted for a stable order.

    Linked folders are followed, as a class folder of links to images elsewhere is (each real folder
    once, so two folders linking to each other are no loop), but not one that holds `folder` itself:
    a link to `..` would walk the split's other classes as this one. A link to nothing is kept, for the
    scan to report it rather than drop it unseen; pipes and devices are left out (reading one blocks). So is
    a folder that cannot be listed (no read permission): os.walk would pass over it and its images unseen."""
    found, walked, real_folder, unlisted = [], set(), os.path.realpath(folder), []
    for top, folders, names in os.walk(folder, followlinks=True, onerror=unlisted.append):
        here = os.stat(top)
        if (here.st_dev, here.st_ino) in walked:
            folders.clear()
            continue
        walked.add((here.st_dev, here.st_ino))
        folders[:] = [name for name in folders if not is_hidden_folder(name)
                      and not is_within(real_folder, os.path.realpath(os.path.join(top, name)))
                      and not passed_over_as_runs(Path(top) / name)]
        paths = (Path(top) / name for name in names if not is_hidden_file(name))
        found += [path for path in paths if path.is_file() or not path.exists()]  # not exists(): a broken link
    return sorted(found + [Path(error.filename) for error in unlisted])


def is_hidden_file(name: str) -> bool:
    """A dot file (a Mac's ._ AppleDouble files and .DS_Store too), one of the SYSTEM_FILES or a Windows
    Zone.Identifier mark (ZONE_IDENTIFIER_ENDS), in any case; not an iCloud placeholder (icloud_original)."""
    folded = name.casefold()
    hidden = name.startswith(".") and not icloud_original(name)
    return hidden or folded in SYSTEM_FILES or folded.endswith(ZONE_IDENTIFIER_ENDS)


def icloud_original(name: str) -> Optional[str]:
    """The name of the file that `name` stands in for, where it is an iCloud Drive placeholder: a Mac that
    optimises its storage (Desktop and Documents are in iCloud by default) replaces a file it has not kept
    with a hidden .photo.jpg.icloud. Passed over as a dot file, a class would train on what is left of it."""
    if not (name.startswith(".") and name.endswith(".icloud") and len(name) > len("..icloud")):
        return None
    original = name[1:-len(".icloud")]
    return None if is_hidden_file(original) else original  # a placeholder of a .DS_Store is passed over as it


def placeholder_problem(path: Path) -> Optional[str]:
    """Why `path` holds no image, where its name says it is a placeholder (icloud_original), else None."""
    original = icloud_original(path.name)
    if original is None:
        return None
    return (f"an iCloud Drive placeholder of {original}, which this Mac has not downloaded; download the folder "
            "(Finder: Download Now), or turn off Optimise Mac Storage")


def is_within(path: str, folder: str) -> bool:
    """Whether the real path `path` is `folder` or lies below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def inspect(path: Path, label: int) -> ImageFile | SkippedFile:
    quiet_pillow_size_warning()
    if placeholder := placeholder_problem(path):
        return SkippedFile(path, placeholder)
    try:
        data = path.read_bytes()
    except OSError as error:  # no permission, a vanished file, an I/O error of the disk
        return unreadable_file(path, error)
    problem, size = decode_check(data)
    if problem:
        return SkippedFile(path, problem)
    return measured_image(path, label, hashlib.sha1(data).hexdigest(), size)


def measured_image(path: Path, label: int, digest: str, size: tuple[int, int]) -> ImageFile:
    width, height = size
    return ImageFile(path, label, digest, width * height, max(width, height) / max(min(width, height), 1))


# What a glance reads of a file: enough for unreadable_kind to tell what a file that is no image holds.
HEAD_BYTES = 1024


def glance(path: Path, label: int) -> ImageFile | SkippedFile:
    """As `inspect`, from the file's header alone: no decode and no digest (an empty one), so a damaged image
    passes; for a caller that decodes each image once anyway and reports a damaged one then."""
    quiet_pillow_size_warning()
    if placeholder := placeholder_problem(path):
        return SkippedFile(path, placeholder)
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEAD_BYTES)
            handle.seek(0)
            problem, size = image_problem(handle, head, decode=False)
    except OSError as error:  # raised by open() or the first read: Pillow's own are a problem of the image
        return unreadable_file(path, error)
    return SkippedFile(path, problem) if problem else measured_image(path, label, "", size)


def unreadable_file(path: Path, error: OSError) -> SkippedFile:
    """A file that could not be read at all, and why: a link to nothing, a folder that could not be listed, or
    the system's reason (no permission, a vanished file, an I/O error of the disk)."""
    if path.is_symlink() and not path.exists():
        return SkippedFile(path, broken_link(path, error))
    if path.is_dir():  # one candidate_files could not list
        return SkippedFile(path, f"a folder that cannot be listed ({why_unlisted(path)}); the images in it "
                                 "are left out")
    return SkippedFile(path, f"unreadable ({error.strerror or error})")


def why_unlisted(folder: Path) -> str:
    """Why `folder` cannot be listed, in the system's words."""
    try:
        os.listdir(folder)
    except OSError as error:
        return error.strerror or str(error)
    return "a passing error"


def broken_link(path: Path, error: OSError) -> str:
    """Why the link at `path` leads to no file: its target is missing, or links lead back round to it."""
    if error.errno == errno.ELOOP:
        return f"a link to {os.readlink(path)} that leads back round to itself (a loop of links)"
    return f"a link to {os.readlink(path)}, which does not exist"


def scan_labelled_files(
    labelled_paths: Iterable[tuple[Path, int]], cache_file: Optional[Path] = None,
) -> tuple[list[ImageFile], list[SkippedFile]]:
    """Decode every file once (a JPEG at 1/8 scale, CHECK_SCALE; threads: PIL releases the GIL while decoding).
    With `cache_file`, a file unchanged since the scan that wrote it (same size, modification and change times,
    inode: git's test for its index) is taken from there instead, so a later run pays a stat per file, not a
    decode and a digest (0.7 s for the monkey set on two cores, 0.06 s from the cache; most of an hour for a
    million images), on every run of every rank."""
    labelled_paths = list(labelled_paths)
    started = time.time_ns()
    earlier = read_scans(cache_file) if cache_file else {}
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        scans = list(pool.map(lambda item: reuse_or_inspect(*item, earlier), labelled_paths))
    if cache_file and (not all(scan.reused for scan in scans) or len(earlier) != len(scans)):
        write_scans(cache_file, scans, started)
    return images_and_skipped([scan.found for scan in scans])


def glance_at_files(labelled_paths: Iterable[tuple[Path, int]]) -> tuple[list[ImageFile], list[SkippedFile]]:
    """As scan_labelled_files, from each file's header alone (`glance`): a header check per file, where a scan
    decodes each (a JPEG at 1/8 scale) and digests it: 100 photos of 6 megapixels take 0.01 s, where a scan takes
    2.8 s (4.4 s decoding them at full size; on two busy cores; 2,000 of the monkey set's small ones: 0.2 s and
    0.5 s)."""
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        return images_and_skipped(list(pool.map(lambda item: glance(*item), labelled_paths)))


def images_and_skipped(found: list[ImageFile | SkippedFile]) -> tuple[list[ImageFile], list[SkippedFile]]:
    return ([f for f in found if isinstance(f, ImageFile)], [f for f in found if isinstance(f, SkippedFile)])


# --- what earlier scans found ----------------------------------------------------------

SCANS_HEADER = {"scans": 1, "pillow": PIL.__version__}  # another Pillow may judge files differently
# File times tick coarsely (a few ms; FAT's in 2 s): a file changed this shortly before a scan began
# may be changed again, at the same size, with the same times. Like git's "racily clean" entries,
# it is inspected again by the next scan rather than trusted.
RACY_NS = 3_000_000_000


@dataclass(frozen=True)
class Scan:
    found: ImageFile | SkippedFile
    identity: Optional[list[int]]  # the file's as it was found (None: it could not be read)
    reused: bool  # taken from an earlier scan

    def record(self) -> dict:
        found = self.found
        if isinstance(found, SkippedFile):
            return {"identity": self.identity, "problem": found.reason}
        return {"identity": self.identity, "digest": found.digest, "pixels": found.pixels,
                "elongation": found.elongation}


def identity(path: Path) -> Optional[list[int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def reuse_or_inspect(path: Path, label: int, earlier: dict) -> Scan:
    now, record = identity(path), earlier.get(os.path.abspath(path))
    if now is None or not record or record.get("identity") != now or record.get("racy", True):
        return Scan(inspect(path, label), now, reused=False)
    if "problem" in record:
        return Scan(SkippedFile(path, record["problem"]), now, reused=True)
    if "elongation" not in record:  # kept before elongations were: the file's header gives it, with no decode
        glanced = glance(path, label)
        elongation = glanced.elongation if isinstance(glanced, ImageFile) else None
        return Scan(ImageFile(path, label, record["digest"], record["pixels"], elongation), now, reused=False)
    return Scan(ImageFile(path, label, record["digest"], record["pixels"], record["elongation"]), now, reused=True)


def read_scans(cache_file: Path) -> dict:
    """What the scan that wrote `cache_file` found, by absolute path; each record says whether it is
    racy (its file changed just before that scan began)."""
    try:
        saved = json.loads(cache_file.read_text())
        if saved["header"] != SCANS_HEADER:
            return {}
        for record in saved["files"].values():
            record["racy"] = record["identity"][2] >= saved["started"] - RACY_NS  # [2]: its change time
    except (OSError, ValueError, KeyError, TypeError, IndexError):  # none yet, or damaged: scan again
        return {}
    mark_used(cache_file)
    return saved["files"]


def write_scans(cache_file: Path, scans: list[Scan], started: int) -> None:
    files = {os.path.abspath(scan.found.path): scan.record() for scan in scans if scan.identity}
    write_cache(cache_file, json.dumps({"header": SCANS_HEADER, "started": started, "files": files}).encode())


def content_key(header: str, files: Iterable[ImageFile]) -> str:
    """A short cache key for what was made from `files`, in the order given: their paths and
    contents, how they decode, and a `header` that names the format and its settings."""
    digest = hashlib.sha256(f"{header} decoding v{DECODING_VERSION}\n".encode())
    for f in files:
        # Absolute: the same folder given as data/x here and as $PWD/data/x in a job script is one entry, not
        # two of 21-257 MiB. surrogateescape: a name that is not UTF-8 (a zip made on Windows) keys by its bytes
        digest.update(f"{os.path.abspath(f.path)}\t{f.digest}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:24]
