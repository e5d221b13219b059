"""lit_accel: a lightweight PyTorch Lightning trainer for fast, steady image classification.

Public API::

    from lit_accel import CIFAR10DataModule, ImageFolderDataModule  # data: CIFAR-10, a folder of your images
    from lit_accel import ImageClassifier, SeedCNN, BatchNormCNN, LiteCNN, ResNet9
    from lit_accel.callbacks import ...
"""

from lit_accel.data import CIFAR10DataModule, ImageFolderDataModule, make_synthetic_cifar
from lit_accel.models import BatchNormCNN, ImageClassifier, LiteCNN, ResNet9, SeedCNN

__version__ = "0.1.0"

__all__ = [
    "BatchNormCNN",
    "CIFAR10DataModule",
    "ImageClassifier",
    "ImageFolderDataModule",
    "LiteCNN",
    "ResNet9",
    "SeedCNN",
    "make_synthetic_cifar",
]
