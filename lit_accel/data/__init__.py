"""Data modules (CIFAR-10, a folder of your images), the synthetic stand-in and device-side augmentation."""

from lit_accel.data.augment import CIFAR10_MEAN, CIFAR10_STD
from lit_accel.data.cifar10 import CIFAR10_CLASSES, CIFAR10DataModule
from lit_accel.data.image_folder_data_module import ImageFolderDataModule
from lit_accel.data.preloaded import PreloadedImageDataModule
from lit_accel.data.synthetic import make_synthetic_cifar

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10DataModule",
    "ImageFolderDataModule",
    "PreloadedImageDataModule",
    "make_synthetic_cifar",
]
