"""Data modules: ``class_path: datamodules.TextDataModule`` in a config."""

from datamodules.text import TextDataModule

__all__ = ["TextDataModule"]
