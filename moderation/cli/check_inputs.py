"""What `moderation check` reads and writes: image files found by content, and unique output names.

Folders are scanned recursively in sorted order. Every regular file is judged by its content, not
its name (`.jfif`, `.avif`, no extension or `"png "` are images when PIL recognises them); files
that are not checked are reported with the reason, never skipped silently. Hidden files and
folders are scanned like any other (a leading dot does not make an image safe to skip).
Symbolic links to files are followed; links to folders are reported, not followed (no loops, no
scan escaping the folder). A file reached twice (named twice, or named and inside a named folder,
or through a link) is checked once.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# Names that claim to be images: such a file is checked (and fails closed as an error decision)
# even when its content cannot be read, instead of being reported as "not an image".
IMAGE_SUFFIXES = {
    ".png",
    ".apng",
    ".jpg",
    ".jpeg",
    ".jfif",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".avif",
    ".heic",
    ".heif",
    ".jxl",
}
# ISO base media files (AVIF, HEIF) carry their brand at bytes 8..12; JPEG XL has two signatures.
_BMFF_IMAGE_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1"}
_JXL_SIGNATURES = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")


@dataclass
class ImageInput:
    """One file to check, and the name of its result under --out (relative to that folder)."""

    path: Path
    name: Path  # its place under the folder it was found in, or its own name when given
    also_given_as: list[Path] = field(default_factory=list)  # the same file reached again
    out_name: Path | None = None


@dataclass
class NotChecked:
    """A file that was found but not checked, and why."""

    path: Path
    reason: str


def display_path(path: Path | str) -> str:
    """The path as text that can be printed and stored: undecodable bytes become \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def collect_inputs(paths: list[Path]) -> list[ImageInput | NotChecked]:
    """Every file to check and every file not checked, in the order given (folders sorted)."""
    found: list[ImageInput | NotChecked] = []
    first: dict[str, ImageInput] = {}  # real path -> the input that reaches it first

    def add(path: Path, name: Path, given: bool) -> None:
        why = _not_a_file(path)
        if why is None and not given:
            why = _not_an_image(path)
        if why is not None:
            found.append(NotChecked(path, why))
            return
        key = os.path.realpath(path)
        if key in first:
            first[key].also_given_as.append(path)
            return
        first[key] = ImageInput(path, name)
        found.append(first[key])

    for given in paths:
        if given.is_dir():
            for path, why in _walk(given):
                if why is None:
                    add(path, path.relative_to(given), given=False)
                else:
                    found.append(NotChecked(path, why))
        else:
            add(given, Path(given.name), given=True)
    return found


def _walk(folder: Path):
    """(file, None) for every file under folder, sorted; (path, why) for what cannot be entered."""
    errors: list[OSError] = []
    for top, dirs, files in os.walk(folder, onerror=errors.append, followlinks=False):
        while errors:
            exc = errors.pop(0)
            yield Path(exc.filename or top), f"folder not readable ({exc.strerror or exc})"
        base = Path(top)
        dirs.sort()
        for name in list(dirs):
            if (base / name).is_symlink():
                dirs.remove(name)
                yield base / name, "link to a folder (not followed)"
        for name in sorted(files):
            yield base / name, None
    for exc in errors:  # the folder itself became unreadable after the first look
        yield Path(exc.filename or folder), f"folder not readable ({exc.strerror or exc})"


def _not_a_file(path: Path) -> str | None:
    """Why path is not a regular file that can be opened (None when it is one)."""
    try:
        mode = os.stat(path).st_mode  # follows links
    except FileNotFoundError:
        return "broken link (its target does not exist)" if path.is_symlink() else "no such file"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "link loop (the link points back to itself)"
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "a folder"
    if not stat.S_ISREG(mode):
        return "not a regular file (a pipe, socket or device is never read)"
    return None


def _not_an_image(path: Path) -> str | None:
    """None when the content is an image (or claims to be one), else why the file is not checked."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: loading decides
            with Image.open(path):  # reads the header only
                return None
    except UnidentifiedImageError:
        pass
    except Image.DecompressionBombError:
        return None  # an image, too large: checking it gives an error decision that says so
    except OSError as exc:
        if path.suffix.lower().strip() in IMAGE_SUFFIXES:
            return None  # named as an image: checking it fails closed with the reason
        return f"unreadable ({exc.strerror or exc})"
    except Exception:  # a plugin choking on a damaged header: an image that cannot be read
        return None
    if path.suffix.lower().strip() in IMAGE_SUFFIXES or _image_signature(path):
        return None  # an image PIL cannot decode: checking it fails closed with the reason
    return "not an image (no image format recognised)"


def _image_signature(path: Path) -> bool:
    """True for image formats this PIL may lack (AVIF/HEIF brands, JPEG XL)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return (
        head[4:8] == b"ftyp"
        and head[8:12] in _BMFF_IMAGE_BRANDS
        or head.startswith(_JXL_SIGNATURES)
    )


def assign_out_names(inputs: list[ImageInput], out_dir: Path) -> None:
    """Give every input a unique result name under out_dir, in order (so it is deterministic).

    The result keeps the input's name and place and ends in `.png` (`a.jpg` -> `a.jpg.png`,
    `a.png` -> `a.png`). A name already taken (two `a.png` from two folders; names that differ
    only in case, for case-insensitive disks) or one that would overwrite an input gets `~2`,
    `~3`, ... before `.png`.
    """
    taken_files: set[str] = set()
    taken_dirs: set[str] = set()
    sources = {os.path.realpath(i.path) for i in inputs}

    def free(candidate: Path) -> bool:
        key = candidate.as_posix().casefold()
        parents = [p.as_posix().casefold() for p in candidate.parents if p != Path(".")]
        return (
            key not in taken_files
            and key not in taken_dirs
            and not any(p in taken_files for p in parents)
            and os.path.realpath(out_dir / candidate) not in sources
        )

    for item in inputs:
        base = item.name if item.name.suffix.lower() == ".png" else Path(f"{item.name}.png")
        candidate, n = base, 2
        while not free(candidate):
            candidate = base.with_name(f"{base.stem}~{n}.png")
            n += 1
        taken_files.add(candidate.as_posix().casefold())
        taken_dirs.update(p.as_posix().casefold() for p in candidate.parents if p != Path("."))
        item.out_name = candidate
