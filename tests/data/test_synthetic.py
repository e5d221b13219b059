import pytest
import torch

from lit_accel.data import make_synthetic_cifar


def test_shapes_types_and_determinism():
    images, labels = make_synthetic_cifar(300, seed=3)
    assert images.shape == (300, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (300,) and labels.dtype == torch.int64
    assert set(labels.tolist()) == set(range(10))
    again_images, again_labels = make_synthetic_cifar(300, seed=3)
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)


def test_splits_and_seeds_differ():
    train, _ = make_synthetic_cifar(50, seed=0, split=0)
    test, _ = make_synthetic_cifar(50, seed=0, split=1)
    other, _ = make_synthetic_cifar(50, seed=1, split=0)
    assert not torch.equal(train, test) and not torch.equal(train, other)


def test_no_shortcut_colour_or_template_gives_the_class_away():
    """The first synthetic set was a class-coloured blob: a nearest-class-mean template told the
    class (0.944 on this test) and the class mean colours differed by up to 32 levels. Here colour
    and pose carry no label: measured 0.12 and 4.1."""
    train_x, train_y = make_synthetic_cifar(2000, seed=0, split=0)
    test_x, test_y = make_synthetic_cifar(500, seed=0, split=1)
    means = torch.stack([train_x[train_y == c].float().mean(0) for c in range(10)])
    distances = torch.cdist(test_x.float().flatten(1), means.flatten(1))
    accuracy = (distances.argmin(1) == test_y).float().mean().item()
    assert accuracy < 0.2
    colours = means.mean((2, 3))  # (class, RGB) in 0..255
    assert float(colours.max(0).values.sub(colours.min(0).values).max()) < 12


def test_paired_classes_share_strokes_and_ambiguous_samples_cannot_be_told_apart(monkeypatch):
    """Classes 2k and 2k+1 share two strokes; an ambiguous sample shows only those, so the same
    pose, colours and noise render a class-0 and a class-1 sample as the same image."""
    from lit_accel.data import synthetic

    glyphs = synthetic.class_glyphs(seed=0, num_classes=10)
    assert torch.equal(glyphs[1::2, : synthetic._SHARED], glyphs[0::2, : synthetic._SHARED])
    assert not torch.equal(glyphs[1::2, synthetic._SHARED :], glyphs[0::2, synthetic._SHARED :])

    def render_pair() -> tuple[torch.Tensor, torch.Tensor]:
        first = synthetic._render(glyphs[[0] * 8], torch.Generator().manual_seed(1))
        second = synthetic._render(glyphs[[1] * 8], torch.Generator().manual_seed(1))
        return first, second

    assert not torch.equal(*render_pair())
    monkeypatch.setattr(synthetic, "_AMBIGUOUS", 1.0)
    assert torch.equal(*render_pair())


@pytest.mark.parametrize("kwargs", [{"num_samples": 0}, {"num_samples": 10, "num_classes": 1}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="is not allowed"):
        make_synthetic_cifar(**kwargs)
