"""Data modules: ``class_path: datamodules.TextDataModule`` (or ``datamodules.StreamingDataModule``) in a config."""

from datamodules.streaming import StreamingDataModule
from datamodules.text import TextDataModule

__all__ = ["StreamingDataModule", "TextDataModule"]
