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


def test_classes_are_separable_by_their_mean_image():
    """Learnable: a nearest-class-mean classifier fit on one split beats chance on the other."""
    train_x, train_y = make_synthetic_cifar(2000, seed=0, split=0)
    test_x, test_y = make_synthetic_cifar(500, seed=0, split=1)
    means = torch.stack([train_x[train_y == c].float().mean(0) for c in range(10)])
    distances = torch.cdist(test_x.float().flatten(1), means.flatten(1))
    accuracy = (distances.argmin(1) == test_y).float().mean().item()
    assert accuracy > 0.3


@pytest.mark.parametrize("kwargs", [{"num_samples": 0}, {"num_samples": 10, "num_classes": 1}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="is not allowed"):
        make_synthetic_cifar(**kwargs)
