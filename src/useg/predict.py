"""Prediction: a trained run as a :class:`Segmenter` (numpy in, numpy out; files in, files out)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from . import runtime
from .checkpoint import load_weights
from .dataset import normalize
from .errors import UsegError
from .io import Image, read_image, write_mask
from .model import UNet, valid_input_size
from .plan import Plan
from .tiling import overlap_tile, sliding_window

logger = logging.getLogger(__name__)

MASK_OUT_SUFFIX = {".png": ".png", ".tif": ".tif", ".tiff": ".tiff"}  # others are written as PNG


def build_model(plan: Plan) -> UNet:
    """The plan's network, freshly initialised."""
    m = plan.model
    return UNet(
        m.in_channels, m.num_classes, dims=m.dims, width=m.width, depth=m.depth,
        padding=m.padding, up=m.up, norm=m.norm, dropout=m.dropout,
    )


def predict_probs(
    model: torch.nn.Module,
    image: np.ndarray,
    plan: Plan,
    device: torch.device,
    precision: runtime.Precision,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Class probabilities of a normalised image, tiled so memory is bounded by the tile.

    Same-padding networks use a Gaussian-blended sliding window; valid-padding networks the
    paper's overlap-tile strategy with mirrored borders.

    Args:
        model: the network, in eval mode, on ``device``.
        image: (C, *S) float32, already normalised.
        plan: the run's plan (tile, overlap, padding, depth).
        device: where the model is.
        precision: autocast and memory format.
        progress: optional callable(done, total) over tiles.

    Returns:
        (K, *S) float32 probabilities.
    """
    m = plan.model
    fmt = runtime.memory_format(m.dims, precision)

    def fn(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device).contiguous(memory_format=fmt)
        with torch.inference_mode(), runtime.autocast(device, precision):
            return torch.softmax(model(batch).float(), dim=1)

    spatial = image.shape[1:]
    tile = tuple(plan.infer.tile)
    if m.padding == "same":
        # A tile larger than the image only wastes compute: shrink it to the image's valid size.
        tile = tuple(min(t, v) for t, v in zip(tile, valid_input_size(spatial, m.depth, m.padding)))
        run = lambda x: sliding_window(  # noqa: E731
            fn, x, tile, m.num_classes, overlap=plan.infer.overlap,
            batch_size=plan.infer.batch_size, device="cpu", progress=progress,
        )
    else:
        out_tile = model.output_size(tile)
        run = lambda x: overlap_tile(  # noqa: E731
            fn, x, tile, out_tile, m.num_classes,
            batch_size=plan.infer.batch_size, device="cpu", progress=progress,
        )
    probs = run(image)
    if plan.infer.tta:
        # Mirroring TTA: average over flips of each spatial axis (nnU-Net's choice).
        n = 1
        for axis in range(1, image.ndim):
            flipped = run(np.ascontiguousarray(np.flip(image, axis)))
            probs += np.flip(flipped, axis)
            n += 1
        probs /= n
    return probs


class Segmenter:
    """A trained U-Net with its pre-processing: ``Segmenter.load(run).predict(array)``.

    Args:
        plan: the run's plan.
        model: the network with trained weights.
        device: "auto", "cpu", "cuda", ...
        precision: "auto", "fp32", "bf16" or "fp16".
    """

    def __init__(self, plan: Plan, model: UNet, device: str = "auto", precision: str = "auto"):
        self.plan = plan
        self.device = runtime.pick_device(device)
        self.precision = runtime.pick_precision(self.device, precision)
        fmt = runtime.memory_format(plan.model.dims, self.precision)
        self.model = model.to(self.device, memory_format=fmt).eval()

    @classmethod
    def load(cls, run: str | Path, device: str = "auto", precision: str = "auto") -> Segmenter:
        """Load ``run/plan.json`` and ``run/model.safetensors`` (no pickle is ever read)."""
        run = Path(run)
        if not run.is_dir():
            raise UsegError(f"{run} is not a run folder; pass the --out folder of 'useg train'")
        plan = Plan.load(run / "plan.json")
        weights = run / "model.safetensors"
        if not weights.exists():
            raise UsegError(f"{weights} is missing; the training did not finish, resume it with 'useg train --resume'")
        model = build_model(plan)
        load_weights(model, weights)
        return cls(plan, model, device=device, precision=precision)

    @property
    def num_classes(self) -> int:
        return self.plan.model.num_classes

    def _prepare(self, array: np.ndarray, name: str = "the array") -> np.ndarray:
        m = self.plan.model
        array = np.asarray(array)
        if array.ndim == m.dims and m.in_channels == 1:
            array = array[None]
        if array.ndim != m.dims + 1:
            raise UsegError(
                f"{name} has shape {array.shape}, but the model expects (C, {'D, ' if m.dims == 3 else ''}H, W) "
                f"with C={m.in_channels}; give channels first"
            )
        if array.shape[0] != m.in_channels:
            raise UsegError(
                f"{name} has {array.shape[0]} channels but the model was trained on {m.in_channels}; "
                "give images like the training images"
            )
        if not np.isfinite(array).all():
            raise UsegError(f"{name} contains NaN or infinite values; fix or mask them before predicting")
        return normalize(array.astype(np.float32), self.plan.data.normalization)

    def predict_proba(self, array: np.ndarray, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Class probabilities.

        Args:
            array: (C, *S) image, or (*S) for a single-channel model; any size.

        Returns:
            (K, *S) float32.
        """
        x = self._prepare(array)
        return predict_probs(self.model, x, self.plan, self.device, self.precision, progress)

    def predict(self, array: np.ndarray, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Class indices (*S) int64 of an image (C, *S) or (*S) for a single-channel model."""
        return self.predict_proba(array, progress).argmax(0).astype(np.int64)

    def predict_image(self, image: Image) -> np.ndarray:
        """Class indices for an :class:`useg.io.Image`."""
        x = self._prepare(image.array, name=str(image.path or "the image"))
        probs = predict_probs(self.model, x, self.plan, self.device, self.precision)
        return probs.argmax(0).astype(np.int64)

    def predict_files(
        self,
        inputs: Sequence[str | Path],
        out_dir: str | Path,
        overwrite: bool = False,
        progress: Callable[[Path], None] | None = None,
    ) -> list[Path]:
        """Predict each input file and write its mask into ``out_dir`` in the training masks' encoding.

        Output names are the input stems (never a path outside ``out_dir``) with the input's suffix
        for PNG/TIFF and ``.png`` otherwise. Existing outputs are refused unless ``overwrite``.

        Returns:
            The written paths, in input order.
        """
        out_dir = Path(out_dir)
        targets = []
        for p in map(Path, inputs):
            suffix = MASK_OUT_SUFFIX.get(p.suffix.lower(), ".png")
            target = out_dir / (Path(p.name).stem + suffix)
            if target in targets:
                raise UsegError(f"{p} and another input both map to {target.name}; rename one of them")
            if target.exists() and not overwrite:
                raise UsegError(f"{target} already exists; pass --overwrite or choose another --out")
            targets.append(target)
        written = []
        for p, target in zip(map(Path, inputs), targets):
            image = read_image(p)
            labels = self.predict_image(image)
            written.append(write_mask(target, labels, like=image, label_map=self.plan.data.label_map))
            if progress is not None:
                progress(p)
        return written


