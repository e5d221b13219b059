"""LightningModule and the networks it wraps."""

from lit_accel.models.classifier import ImageClassifier
from lit_accel.models.nets import BatchNormCNN, LiteCNN, ResNet9, SeedCNN

__all__ = ["BatchNormCNN", "ImageClassifier", "LiteCNN", "ResNet9", "SeedCNN"]
