"""A folder of ordinary image files (PNG, JPEG, …, any size) as 32×32 uint8 images, for prediction.

Resize rule: the shorter side is scaled to 32 pixels (bilinear, antialiased, aspect ratio kept; a
JPEG at least twice that size is first decoded at a reduced scale by libjpeg, Pillow's ``draft``),
then the central 32×32 square is cut out; so a 64×48 photo becomes 42×32 (torchvision rounds the
longer side down) and loses 5 columns on each side. This matches how CIFAR-10's images were made
(downscaled, object centred). Grayscale and palette images become RGB, an alpha channel is
dropped, a JPEG's EXIF orientation is applied, 16-bit images are scaled to 8 bits, and 32-bit
float images (TIFF) are read as values in [0, 1] (torchvision's convention), clipped.

Formats: whatever Pillow opens (PNG, JPEG, GIF — its first frame —, WebP, BMP, TIFF, …).
(Pillow rather than ``torchvision.io``, whose decoders are deprecated since torchvision 0.29.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

__all__ = ["ImageFolderDataset", "read_image_file"]

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
_WIDE_GRAYSCALE_MODES = ("I;16", "I;16L", "I;16B", "I")  # 16-bit grayscale ("I": how Pillow opens some 16-bit PNGs)


def read_image_file(path: str, size: int = IMAGE_SIZE) -> Tensor:
    """One image file → uint8 ``(3, size, size)``, by the module's resize rule.

    Raises:
        Exception: whatever Pillow raises for a file that is not a readable image
            (``UnidentifiedImageError``, ``OSError`` for a truncated file, …).
    """
    from PIL import Image, ImageOps
    from torchvision.transforms.v2 import functional as F

    with Image.open(path) as opened:
        if opened.format == "JPEG":
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale while both sides stay >= size: a photo many
            # times the target size decodes several times faster, and is resized from there.
            opened.draft("RGB", (size, size))
        picture = ImageOps.exif_transpose(opened)
        if picture.mode in _WIDE_GRAYSCALE_MODES:
            # convert("RGB") would clip 16-bit values at 255 instead of scaling them to 8 bits.
            picture = picture.point(lambda value: value / 256).convert("L")
        elif picture.mode == "F":
            # convert("RGB") would take the floats as 0-255 values: an image in [0, 1] turned black.
            picture = picture.point(lambda value: value * 255 + 0.5).convert("L")
        image = F.pil_to_tensor(picture.convert("RGB"))
    image = F.resize(image, [size], antialias=True)  # one number: the shorter side
    return F.center_crop(image, [size, size]).contiguous()


def list_files(root: str) -> list[str]:
    """Every file below ``root``, as sorted ``/``-separated relative paths.

    Regular files are listed, and so are symbolic links that lead nowhere (dangling, or a loop):
    reading those fails, and :class:`ImageFolderDataset` names them as it names any unreadable
    image. Hidden files and folders (name starts with ``.``) are left out: editors' and notebooks'
    droppings, ``.DS_Store``. Other entries are left out with a warning naming them: links to
    folders (not followed, as they may loop), pipes, sockets and devices (reading a pipe would
    wait for ever).
    """
    found: list[str] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in subfolders:
            if os.path.islink(os.path.join(folder, name)):  # os.walk does not follow them: a link may loop
                relative = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
                log.warning("skipped %s/: a link to a folder (not followed; link the image files instead)", relative)
        for name in files:
            path = os.path.join(folder, name)
            if name.startswith("."):
                continue
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            # exists() is False for a link whose target is missing or loops back (ELOOP).
            if os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path)):
                found.append(relative)
            else:
                log.warning("skipped %s: not a regular file (a pipe, socket or device)", relative)
    return sorted(found)


class ImageFolderDataset(Dataset):
    """Every file below a folder, decoded and brought to 32×32 (see the module's resize rule).

    Items are ``(image, name)``: ``image`` uint8 ``(3, 32, 32)`` (or ``transform(image)``), ``name``
    the file's path relative to ``root`` with ``/`` separators, which a prediction writer puts in
    its output. Files are decoded lazily, in DataLoader workers when there are any. A file that is
    not a readable image is logged once, with its name and the reason, and its item is ``None``:
    use :meth:`collate` as the DataLoader's ``collate_fn`` to drop those.

    Args:
        root: the folder; subfolders are included, hidden files and folders are not.
        transform: applied to each uint8 image (e.g. conversion to normalized float32).
        image_size: side of the square images, in pixels.

    Raises:
        NotADirectoryError: if ``root`` is not a folder.
        ValueError: for ``image_size`` < 1.
    """

    def __init__(
        self, root: str, transform: Callable[[Tensor], Tensor] | None = None, image_size: int = IMAGE_SIZE
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size={image_size!r} is not allowed: use a positive number of pixels")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"{root!r} is not a folder")
        self.root = root
        self.transform = transform
        self.image_size = image_size
        self.files = list_files(root)

    def __len__(self) -> int:
        return len(self.files)

    @override
    def __getitem__(self, index: int) -> tuple[Tensor, str] | None:
        name = self.files[index]
        try:
            image = read_image_file(os.path.join(self.root, name), self.image_size)
        except Exception as err:  # any decoder failure means the same thing: not a usable image
            log.warning("skipped %s: not a readable image (%s: %s)", name, type(err).__name__, err)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, name

    def collate(self, items: Sequence[tuple[Tensor, str] | None]) -> tuple[Tensor, list[str]]:
        """Stack the readable items of a batch: ``(images (N, 3, S, S), names)``; N may be 0."""
        kept = [item for item in items if item is not None]
        if not kept:
            blank = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
            example = self.transform(blank) if self.transform is not None else blank
            return example.unsqueeze(0)[:0], []
        return torch.stack([image for image, _ in kept]), [name for _, name in kept]
