"""Image files decoded once into a uint8 tensor, cached on disk and rebuilt when the files change.

A folder of images is decoded by :func:`~lit_accel.data.image_folder.read_image_file` (shorter side
to ``image_size``, centre crop, RGB) in a pool of worker processes, straight into one preallocated
``(N, 3, S, S)`` uint8 tensor: memory is that tensor (``N·3·S·S`` bytes: 20,000 images at 64 px
are 246 MB) plus a few batches in flight. The result is saved as one file, written beside its
final name and renamed into place (a kill leaves no half file under that name), and read back
with ``torch.load(weights_only=True)``. It is used again only when it was made by this format, at
this size, from exactly the same files (name, class, size in bytes and modification time); else it
is rebuilt, and a log line says why.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler
from typing_extensions import override

from lit_accel.data.image_folder import list_files, read_image_file
from lit_accel.errors import ConfigurationError, DataNotFoundError

__all__ = [
    "CACHE_FORMAT",
    "IMAGE_EXTENSIONS",
    "DecodedImages",
    "ImageEntry",
    "decode_images",
    "load_or_decode",
    "save_atomically",
]

log = logging.getLogger(__name__)
# Under Lightning's logger, whose console handler shows INFO lines: every process that decodes says so
# (under DDP that is local rank 0, in prepare_data), not only global rank 0 as rank_zero_info would.
console = logging.getLogger("lightning.pytorch.lit_accel.image_cache")

# Raise it whenever read_image_file's rule or the cache's layout changes: older caches are rebuilt.
CACHE_FORMAT = 1
# torchvision ImageFolder's extensions for the formats Pillow reads (GIF: its first frame).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_NAMES_SHOWN = 5  # unreadable files named in a warning
# Files per worker task: up to 128, fewer for large images (about 4 MB of decoded pixels per chunk),
# so that with prefetch 2 at most 2 × workers chunks are in flight. Each chunk costs the main
# process a hand-over (a pickle and a shared-memory file): fewer, larger chunks leave it idle.
_DECODE_CHUNK_FILES = 128
_DECODE_CHUNK_BYTES = 4 * 2**20


def decode_chunk_files(image_size: int) -> int:
    """Files per decoding task at ``image_size`` (see ``_DECODE_CHUNK_BYTES``)."""
    return max(1, min(_DECODE_CHUNK_FILES, _DECODE_CHUNK_BYTES // (3 * image_size * image_size)))


@dataclass(frozen=True)
class ImageEntry:
    """One image file: its ``/``-separated path below the split's folder, class index, size and mtime."""

    name: str
    label: int
    size: int
    mtime_ns: int


@dataclass
class DecodedImages:
    """A split decoded: ``images`` uint8 ``(N, 3, S, S)``, ``labels`` int64 ``(N,)``, the ``names`` of
    those N files, and the ``skipped`` files that were not readable images (``skip_unreadable``)."""

    images: Tensor
    labels: Tensor
    names: list[str]
    skipped: list[str]


def image_entries(folder: str, classes: Sequence[str]) -> list[ImageEntry]:
    """Every image file below ``folder/<class>/`` (subfolders included), sorted, with its class index.

    Files whose extension is not one of :data:`IMAGE_EXTENSIONS` are left out, as torchvision's
    ``ImageFolder`` does; hidden files and folders too (:func:`~lit_accel.data.image_folder.list_files`).
    """
    entries = []
    for label, name in enumerate(classes):
        for relative in list_files(os.path.join(folder, name)):
            if not relative.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(folder, name, relative)
            try:
                stat = os.stat(path)
                size, mtime_ns = stat.st_size, stat.st_mtime_ns
            except OSError:  # a dangling link: kept, so that decoding names it as unreadable
                size, mtime_ns = -1, -1
            entries.append(ImageEntry(f"{name}/{relative}", label, size, mtime_ns))
    return entries


class _FileChunks(Dataset):
    """One chunk of files per item: ``(indices, images, errors)``, the chunk's images stacked in one
    uint8 tensor (a worker hands the main process one shared-memory tensor per chunk, not one per
    image: per-image hand-overs cost more than decoding a small image), ``errors[i]`` None when
    ``indices[i]`` decoded (its slot of ``images`` is then filled) or the decoder's message."""

    def __init__(self, folder: str, names: Sequence[str], image_size: int) -> None:
        self.folder, self.names, self.image_size = folder, names, image_size

    def __len__(self) -> int:
        return len(self.names)

    @override
    def __getitem__(self, indices: list[int]) -> tuple[list[int], Tensor, list[str | None]]:
        size = self.image_size
        images = torch.zeros((len(indices), 3, size, size), dtype=torch.uint8)
        errors: list[str | None] = []
        for slot, index in enumerate(indices):
            try:
                images[slot] = read_image_file(os.path.join(self.folder, self.names[index]), size)
                errors.append(None)
            except Exception as err:  # any decoder failure means the same thing: not a usable image
                errors.append(f"{type(err).__name__}: {err}")
        return indices, images, errors


def _as_is(chunk: Any) -> Any:
    return chunk


def decode_images(
    folder: str,
    entries: Sequence[ImageEntry],
    image_size: int,
    workers: int,
    skip_unreadable: bool,
    what: str = "images",
) -> DecodedImages:
    """Decode ``entries`` (below ``folder``) with ``workers`` processes into one uint8 tensor.

    Args:
        folder: the split's folder.
        entries: its files (:func:`image_entries`).
        image_size: side of the square images, in pixels.
        workers: decoding processes (0: in this process).
        skip_unreadable: leave unreadable files out (one warning) instead of stopping.
        what: names the split in the progress bar.

    Raises:
        DataNotFoundError: for the first unreadable file (unless ``skip_unreadable``), or when no
            file at all could be read.
    """
    names = [entry.name for entry in entries]
    images = torch.empty((len(entries), 3, image_size, image_size), dtype=torch.uint8)
    readable = torch.ones(len(entries), dtype=torch.bool)
    errors: dict[int, str] = {}
    chunks = BatchSampler(SequentialSampler(range(len(names))), decode_chunk_files(image_size), drop_last=False)
    loader = DataLoader(
        _FileChunks(folder, names, image_size),
        batch_size=None,  # the sampler hands out whole chunks
        sampler=chunks,
        num_workers=workers,
        collate_fn=_as_is,
        prefetch_factor=2 if workers > 0 else None,
        # Its own generator: the loader's base seed is not drawn from torch's global one, so a run
        # that decodes trains exactly like one that finds the cache (same augmentations, dropout).
        generator=torch.Generator(),
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=len(entries), desc=f"decoding {what}", unit="img", disable=not sys.stderr.isatty(), leave=False)
    with bar:
        for indices, decoded, chunk_errors in loader:
            for index, error in zip(indices, chunk_errors):
                if error is not None:
                    if not skip_unreadable:
                        raise DataNotFoundError(
                            f"{os.path.join(folder, names[index])} is not a readable image ({error}). Delete it (or "
                            "replace it with a good copy), or pass --data.skip_unreadable true to leave unreadable "
                            "files out."
                        )
                    readable[index] = False
                    errors[index] = str(error)
            # a chunk is consecutive files: one copy (an unreadable file's zeros are dropped below)
            images[indices[0] : indices[-1] + 1] = decoded
            bar.update(len(indices))
    skipped = [names[index] for index in sorted(errors)]
    if not readable.any():
        raise DataNotFoundError(f"none of the {len(entries)} files in {folder} is a readable image.")
    labels = torch.tensor([entry.label for entry in entries], dtype=torch.long)
    if skipped:
        keep = readable.nonzero().squeeze(1)
        images, labels = images[keep], labels[keep]  # one copy, only when something was skipped
        names = [names[index] for index in keep.tolist()]
    return DecodedImages(images, labels, names, skipped)


def save_atomically(content: dict[str, Any], path: str) -> None:
    """``torch.save`` into a temporary file beside ``path``, flushed to disk, then renamed onto it.

    A kill at any moment leaves either the old file or the new one under ``path``, never a part of
    one (the temporary file, ``.<name>.*.partial``, is removed on an error).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(handle, 0o666 & ~umask)  # as open() would create it: mkstemp's 0600 would hide it from others
        with os.fdopen(handle, "wb") as f:
            torch.save(content, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def _entry_rows(entries: Sequence[ImageEntry]) -> list[list[Any]]:
    return [[entry.name, entry.label, entry.size, entry.mtime_ns] for entry in entries]


def _read_cache(path: str) -> dict[str, Any] | None:
    """The cache file's content, or None (with one warning) when it cannot be read or is malformed."""
    try:
        content = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # a torn or foreign file: whatever the reader raises, it is rebuilt
        reason = f"{type(err).__name__}: {err}"
        log.warning("the image cache %s cannot be read (%s): decoding the images again", path, reason)
        return None
    if not isinstance(content, dict) or content.get("format") != CACHE_FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        log.warning(
            "the image cache %s was written by another version of lit_accel (format %s, this one reads %s): "
            "decoding the images again",
            path,
            found,
            CACHE_FORMAT,
        )
        return None
    images, labels, names = content.get("images"), content.get("labels"), content.get("names")
    well_formed = (
        isinstance(images, Tensor)
        and isinstance(labels, Tensor)
        and isinstance(names, list)
        and images.dtype == torch.uint8
        and images.ndim == 4
        and labels.dtype == torch.long
        and images.shape[0] == labels.shape[0] == len(names)
        and isinstance(content.get("entries"), list)
        and isinstance(content.get("skipped"), list)
    )
    if not well_formed:
        log.warning("the image cache %s is damaged (its parts do not fit together): decoding the images again", path)
        return None
    return content


def _what_changed(old: dict[str, Any], entries: Sequence[ImageEntry], image_size: int, classes: list[str]) -> str:
    """Why a readable cache does not fit: the size, the class names, or how many files changed."""
    if old.get("image_size") != image_size:
        return f"image_size changed ({old.get('image_size')} -> {image_size} px)"
    if old.get("classes") != classes:
        return "the class folders changed"
    before = {row[0]: tuple(row[1:]) for row in old["entries"]}
    now = {entry.name: (entry.label, entry.size, entry.mtime_ns) for entry in entries}
    added = len(now.keys() - before.keys())
    removed = len(before.keys() - now.keys())
    modified = sum(1 for name in now.keys() & before.keys() if now[name] != before[name])
    return f"{added + removed + modified} files changed ({added} added, {removed} removed, {modified} modified)"


def check_writable(path: str) -> None:
    """The cache file can be written where it is to go, or one message naming ``--data.cache_dir``.

    Raises:
        ConfigurationError: when the nearest existing folder of ``path`` is not writable, or is a file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"the decoded-image cache cannot be written in {folder} ({existing} is "
            f"{'not a folder' if not os.path.isdir(existing) else 'read-only for this user'}): pass "
            "--data.cache_dir DIR, a folder you can write in."
        )


def load_or_decode(
    folder: str,
    entries: Sequence[ImageEntry],
    classes: Sequence[str],
    image_size: int,
    cache_path: str,
    workers: int,
    skip_unreadable: bool,
    what: str = "images",
) -> DecodedImages:
    """The decoded split from ``cache_path`` when it fits these files and size, else decoded and cached.

    Args:
        folder: the split's folder.
        entries: its image files (:func:`image_entries`), the key of the cache with ``image_size``.
        classes: the class names (``entries``' labels index them).
        image_size: side of the square images, in pixels.
        cache_path: the cache file.
        workers: decoding processes.
        skip_unreadable: leave unreadable files out with one warning instead of stopping.
        what: names the split in messages.

    Raises:
        DataNotFoundError: an unreadable image (without ``skip_unreadable``; also when the cache was
            made with it and lists skipped files).
        ConfigurationError: the cache cannot be written.
    """
    class_list = [str(name) for name in classes]
    rows = _entry_rows(entries)
    reason = "no cache yet"
    if os.path.exists(cache_path):
        old = _read_cache(cache_path)
        if old is None:
            reason = "the cache was unreadable"
        elif old["entries"] == rows and old.get("image_size") == image_size and old.get("classes") == class_list:
            decoded = DecodedImages(old["images"], old["labels"], list(old["names"]), list(old["skipped"]))
            _check_skipped(folder, decoded.skipped, skip_unreadable, what)
            return decoded
        else:
            reason = _what_changed(old, entries, image_size, class_list)
    check_writable(cache_path)
    console.info(f"{what}: decoding {len(entries)} images at {image_size} px into {cache_path} ({reason})")
    decoded = decode_images(folder, entries, image_size, workers, skip_unreadable, what)
    content = {
        "format": CACHE_FORMAT,
        "image_size": image_size,
        "classes": class_list,
        "entries": rows,
        "names": decoded.names,
        "skipped": decoded.skipped,
        "images": decoded.images,
        "labels": decoded.labels,
    }
    try:
        save_atomically(content, cache_path)
    except OSError as err:
        raise ConfigurationError(
            f"the decoded-image cache {cache_path} could not be written ({type(err).__name__}: {err}): free some "
            "space there, or pass --data.cache_dir DIR, a folder you can write in."
        ) from None
    _check_skipped(folder, decoded.skipped, skip_unreadable, what)
    return decoded


def _check_skipped(folder: str, skipped: list[str], skip_unreadable: bool, what: str) -> None:
    if not skipped:
        return
    if not skip_unreadable:  # a cache made with skip_unreadable, read without it
        raise DataNotFoundError(
            f"{os.path.join(folder, skipped[0])} is not a readable image ({len(skipped)} such files in {what}). Delete "
            "it (or replace it with a good copy), or pass --data.skip_unreadable true to leave unreadable files out."
        )
    shown = ", ".join(skipped[:_NAMES_SHOWN]) + (", ..." if len(skipped) > _NAMES_SHOWN else "")
    log.warning("%s: skipped %d unreadable image files (skip_unreadable): %s", what, len(skipped), shown)
