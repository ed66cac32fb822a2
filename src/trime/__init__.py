"""trime: Training language models with memory augmentation (TRIME), in plain PyTorch."""

__version__ = "0.1.0"
