"""useg: U-Net segmentation for biomedical images (Ronneberger, Fischer, Brox 2015, and since)."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import UsegError  # noqa: E402
from .model import UNet  # noqa: E402

__all__ = ["UNet", "Segmenter", "UsegError", "__version__"]


def __getattr__(name: str):
    # Segmenter pulls in I/O and tiling; import it on first use so `import useg` stays light.
    if name == "Segmenter":
        from .predict import Segmenter

        return Segmenter
    raise AttributeError(f"module 'useg' has no attribute {name!r}")
