"""A minimal torchvision stand-in for TinyWorlds' training scripts (see ../README.md)."""
from . import datasets, transforms, utils  # noqa: F401

__version__ = "0.0-tinyworlds-standin"
