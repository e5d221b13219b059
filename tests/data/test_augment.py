import pytest
import torch
from torchvision.transforms import v2

from lit_accel.data.augment import CIFAR10_MEAN, CIFAR10_STD, cutout, normalize, random_crop, random_flip


def _identical_batch(n: int = 64) -> torch.Tensor:
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return image.repeat(n, 1, 1, 1)


def test_normalize_matches_torchvision():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    expected = torch.stack([reference(img) for img in images])
    torch.testing.assert_close(normalize(images), expected)


def test_random_crop_is_a_per_sample_shifted_window():
    torch.manual_seed(0)
    batch = _identical_batch()
    cropped = random_crop(batch, padding=4)
    assert cropped.shape == batch.shape and cropped.dtype == torch.uint8
    padded = torch.nn.functional.pad(batch[0], (4, 4, 4, 4))
    windows = {(dy, dx): padded[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)}
    offsets = set()
    for out in cropped:
        match = [key for key, window in windows.items() if torch.equal(window, out)]
        assert match, "every output must be a 32x32 window of the zero-padded image"
        offsets.add(match[0])
    assert len(offsets) > 10, "per-sample offsets: a batch of 64 must use many different windows"


def test_random_flip_flips_some_not_all():
    torch.manual_seed(0)
    batch = _identical_batch()
    flipped = random_flip(batch)
    is_flipped = [torch.equal(out, batch[0].flip(-1)) for out in flipped]
    is_same = [torch.equal(out, batch[0]) for out in flipped]
    assert all(a or b for a, b in zip(is_flipped, is_same))
    assert 10 < sum(is_flipped) < 54


def test_cutout_zeroes_a_square_of_the_given_size_at_different_places():
    torch.manual_seed(0)
    images = torch.ones(64, 3, 32, 32)
    out = cutout(images, size=8)
    zero_masks = out[:, 0] == 0
    areas = zero_masks.sum(dim=(1, 2))
    assert int(areas.max()) == 64 and int(areas.min()) > 0  # clipped at the border at most
    assert len({tuple(m.nonzero()[0].tolist()) for m in zero_masks}) > 10
    assert torch.equal(out[:, 0], out[:, 2]), "the same square in every channel"


@pytest.mark.parametrize("padding,size", [(0, 0)])
def test_zero_settings_are_identity(padding, size):
    batch = _identical_batch(4)
    assert torch.equal(random_crop(batch, padding), batch)
    assert torch.equal(cutout(batch.float(), size), batch.float())
