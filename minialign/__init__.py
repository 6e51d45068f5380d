"""minialign: align small language models from scratch in pure PyTorch."""

__version__ = "0.1.0"
