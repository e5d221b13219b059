"""LightningModule and the networks it wraps."""

from lit_accel.models.classifier import ImageClassifier
from lit_accel.models.nets import BatchNormCNN, ResNet9, SeedCNN

__all__ = ["BatchNormCNN", "ImageClassifier", "ResNet9", "SeedCNN"]
