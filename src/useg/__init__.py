"""useg: U-Net segmentation for biomedical images (Ronneberger, Fischer, Brox 2015, and since)."""

from __future__ import annotations

from .errors import UsegError
from .model import UNet
from .runtime import package_version

__version__ = package_version()

__all__ = ["UNet", "Segmenter", "UsegError", "__version__"]


def __getattr__(name: str):
    # Segmenter pulls in I/O and tiling; import it on first use so `import useg` stays light.
    if name == "Segmenter":
        from .predict import Segmenter

        return Segmenter
    raise AttributeError(f"module 'useg' has no attribute {name!r}")
