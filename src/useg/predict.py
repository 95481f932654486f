"""Prediction: a trained run as a :class:`Segmenter` (numpy in, numpy out; files in, files out)."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import runtime
from .checkpoint import load_weights
from .dataset import Case
from .errors import UsegError
from .instances import label_instances
from .io import Image, stem_of, suffix_of, write_mask
from .labels import regions_to_labels
from .layouts import read_case_image
from .model import UNet, output_size, valid_input_size
from .plan import Plan
from .preprocess import normalize
from .tiling import overlap_tile, overlap_tile_labels, sliding_window, sliding_window_labels

logger = logging.getLogger(__name__)

MASK_OUT_SUFFIX = {".png": ".png", ".tif": ".tif", ".tiff": ".tiff", ".nii": ".nii", ".nii.gz": ".nii.gz"}


def build_model(plan: Plan) -> UNet:
    """The plan's network, freshly initialised."""
    m = plan.model
    return UNet(
        m.in_channels, m.num_classes, dims=m.dims, width=m.width, depth=m.depth,
        padding=m.padding, up=m.up, norm=m.norm, dropout=m.dropout, max_width=m.max_width,
    )


def tile_fn(model: torch.nn.Module, plan: Plan, device: torch.device,
            precision: runtime.Precision) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-tile network call: (B, C, *tile) -> (B, K, *out_tile) softmax probabilities.

    With ``plan.infer.tta`` each tile is also predicted under the symmetries of
    :func:`symmetries` and the probabilities mapped back and averaged (nnU-Net mirrors per tile
    too), which keeps tiling and its memory bound unchanged.
    """
    fmt = runtime.memory_format(plan.model.dims, precision)
    activate = output_activation(plan)

    def fn(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device).contiguous(memory_format=fmt)
        with torch.inference_mode(), runtime.autocast(device, precision):
            return tta_average(lambda x: activate(model(x.contiguous(memory_format=fmt)).float()), batch, plan)

    return fn


def symmetries(plan: Plan, shape: Sequence[int]) -> list[tuple[bool, tuple[int, ...]]]:
    """The test-time transforms of a (B, C, *tile) batch: (transpose the last two axes?, flipped axes).

    Identity first. Without ``plan.infer.tta`` only the identity; with it every combination of
    mirrored axes (4 in 2D, 8 in 3D); with ``plan.infer.tta_rotate`` and a square 2D tile also the
    transposed ones, so all 8 symmetries of the square (the paper averaged rotated and mirrored
    versions). Each set is a group, so the average is exactly equivariant under it.
    """
    if not plan.infer.tta:
        return [(False, ())]
    axes = range(2, len(shape))
    flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    rotate = plan.infer.tta_rotate and len(shape) == 4 and shape[-1] == shape[-2]
    return [(t, f) for t in ((False, True) if rotate else (False,)) for f in flips]


def tta_average(probs_of: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Mean of ``probs_of`` over :func:`symmetries`, each mapped back to the input's frame."""
    out = None
    transforms = symmetries(plan, tuple(batch.shape))
    for transpose, axes in transforms:
        x = batch.transpose(-1, -2) if transpose else batch
        p = probs_of(x.flip(axes) if axes else x)
        p = p.flip(axes) if axes else p  # undo in reverse order: flip, then transpose
        p = p.transpose(-1, -2) if transpose else p
        out = p if out is None else out + p
    return out / len(transforms) if len(transforms) > 1 else out


def output_activation(plan: Plan) -> Callable[[torch.Tensor], torch.Tensor]:
    """Softmax over classes, or a sigmoid per region for region-trained plans."""
    if plan.data.regions:
        return torch.sigmoid
    return lambda logits: torch.softmax(logits, dim=1)


def _same_tile(plan: Plan, spatial: tuple[int, ...]) -> tuple[int, ...]:
    # A tile larger than the image only wastes compute: shrink it to the image's valid size.
    m = plan.model
    return tuple(min(t, v) for t, v in zip(plan.infer.tile, valid_input_size(spatial, m.depth, m.padding)))


def predict_probs(
    model: torch.nn.Module,
    image: np.ndarray,
    plan: Plan,
    device: torch.device,
    precision: runtime.Precision,
    progress: Callable[[int, int], None] | None = None,
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Class probabilities of a normalised image, tiled.

    Same-padding networks use a Gaussian-blended sliding window; valid-padding networks the
    paper's overlap-tile strategy with mirrored borders.

    Args:
        model: the network, in eval mode, on ``device``.
        image: (C, *S) float32, already normalised.
        plan: the run's plan (tile, overlap, padding, depth, tta).
        device: where the model is.
        precision: autocast and memory format.
        progress: optional callable(done, total) over tiles.
        fn: the tile function to use instead of the model's (an ONNX session's, say); ``model``,
            ``device`` and ``precision`` are unused then.

    Returns:
        (K, *S) float32 probabilities.
    """
    m, fn = plan.model, fn or tile_fn(model, plan, device, precision)
    if m.padding == "same":
        # tile starts on the pooling grid, so every tile sees the same max-pooling phase
        return sliding_window(fn, image, _same_tile(plan, image.shape[1:]), m.num_classes,
                              overlap=plan.infer.overlap, batch_size=plan.infer.batch_size, progress=progress,
                              align=2**m.depth)
    tile = tuple(plan.infer.tile)
    return overlap_tile(fn, image, tile, output_size(tile, m.depth, m.padding), m.num_classes,
                        batch_size=plan.infer.batch_size, progress=progress)


def predict_labels(
    model: torch.nn.Module,
    image: np.ndarray,
    plan: Plan,
    device: torch.device,
    precision: runtime.Precision,
    progress: Callable[[int, int], None] | None = None,
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Class indices (*S) of a normalised image; same arguments as :func:`predict_probs`.

    For same padding the sliding window is streamed (:func:`useg.tiling.sliding_window_labels`),
    so no (K, *S) float buffer is ever held: memory is bounded by one slab of tiles. For valid
    padding each overlap-tile output tile writes its argmax directly
    (:func:`useg.tiling.overlap_tile_labels`). Region plans hold (R, *S) region probabilities.
    """
    m = plan.model
    if plan.data.regions:  # region probabilities are thresholded, not arg-maxed: R channels held, R small
        return regions_to_labels(predict_probs(model, image, plan, device, precision, progress, fn), plan.data.regions)
    if m.padding == "same":
        fn = fn or tile_fn(model, plan, device, precision)
        return sliding_window_labels(fn, image, _same_tile(plan, image.shape[1:]), m.num_classes,
                                     overlap=plan.infer.overlap, batch_size=plan.infer.batch_size,
                                     progress=progress, align=2**m.depth)
    # overlap-tile output tiles do not overlap: each tile's argmax is final, no (K, *S) buffer
    tile = tuple(plan.infer.tile)
    return overlap_tile_labels(fn or tile_fn(model, plan, device, precision), image, tile,
                               output_size(tile, m.depth, m.padding), m.num_classes,
                               batch_size=plan.infer.batch_size, progress=progress)


def prepare(plan: Plan, array: np.ndarray, name: str = "the array") -> np.ndarray:
    """Check an image against the plan and normalise it: (C, *S) or (*S) for one channel -> (C, *S) float32.

    Raises:
        UsegError: wrong dimensions or channel count, NaN or infinite values.
    """
    m, d = plan.model, plan.data
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
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise UsegError(f"{name} contains NaN or infinite values; fix or mask them before predicting")
    return normalize(array, d.normalization, d.intensity)  # float32 copy, the input is untouched


class Segmenter:
    """A trained U-Net with its pre-processing: ``Segmenter.load(run).predict(array)``.

    Args:
        plan: the run's plan.
        model: the network with trained weights.
        device: "auto", "cpu", "cuda", ...
        precision: "auto", "fp32", "bf16" or "fp16".
    """

    def __init__(self, plan: Plan, model: UNet | None, device: str = "auto", precision: str = "auto",
                 session=None):
        self.plan = plan
        self.device = runtime.pick_device(device if session is None else "cpu")
        self.precision = runtime.pick_precision(self.device, precision if session is None else "fp32")
        fmt = runtime.memory_format(plan.model.dims, self.precision)
        self.model = model.to(self.device, memory_format=fmt).eval() if model is not None else None
        self.session = session  # an onnxruntime session replaces the torch model

    def _fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.session is not None:
            from .export import onnx_tile_fn

            return onnx_tile_fn(self.session, self.plan)
        return tile_fn(self.model, self.plan, self.device, self.precision)

    @classmethod
    def load(cls, run: str | Path, device: str = "auto", precision: str = "auto", backend: str = "torch") -> Segmenter:
        """Load ``run/plan.json`` and ``run/model.safetensors`` (no pickle is ever read).

        ``backend="onnxruntime"`` runs ``run/model.onnx`` from ``useg export`` instead (CPU).
        """
        run = Path(run)
        if not run.is_dir():
            raise UsegError(f"{run} is not a run folder; pass the --out folder of 'useg train'")
        if backend == "onnxruntime":
            from .export import load_exported

            onnx_path = run / "model.onnx"
            if not onnx_path.exists():
                raise UsegError(f"{onnx_path} is missing; run 'useg export {run}' first")
            plan, session = load_exported(onnx_path)
            return cls(plan, None, session=session)
        if backend != "torch":
            raise ValueError(f"backend must be torch or onnxruntime, not {backend!r}")
        plan = Plan.load(run / "plan.json")
        weights = run / "model.safetensors"
        if not weights.exists():
            raise UsegError(f"{weights} is missing; the training did not finish, resume it with 'useg train --resume'")
        model = build_model(plan)
        load_weights(model, weights)
        checked = run / "inference.json"  # training compared the fast path with fp32 on this model
        if precision == "auto" and checked.exists():
            try:
                if json.loads(checked.read_text(encoding="utf-8")).get("precision") == "fp32":
                    precision = "fp32"
            except (OSError, ValueError):
                pass  # an unreadable record only costs the fallback
        return cls(plan, model, device=device, precision=precision)

    @property
    def num_classes(self) -> int:
        return self.plan.model.num_classes

    def _prepare(self, array: np.ndarray, name: str = "the array") -> np.ndarray:
        return prepare(self.plan, array, name)

    def predict_proba(self, array: np.ndarray, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Class probabilities.

        Args:
            array: (C, *S) image, or (*S) for a single-channel model; any size.

        Returns:
            (K, *S) float32.
        """
        x = self._prepare(array)
        return predict_probs(self.model, x, self.plan, self.device, self.precision, progress, self._fn())

    def predict(self, array: np.ndarray, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Class indices (*S) int64 of an image (C, *S) or (*S) for a single-channel model.

        Memory stays bounded by a slab of tiles (same padding), whatever the image size.
        """
        x = self._prepare(array)
        return predict_labels(self.model, x, self.plan, self.device, self.precision, progress, self._fn()).astype(np.int64)

    def _image_input(self, image: Image) -> tuple[np.ndarray, bool]:
        d = self.plan.data
        array = image.array
        resample = d.resample and not np.allclose(image.spacing, d.spacing, rtol=1e-3)
        if resample:
            from .resample import resample_image

            array = resample_image(array.astype(np.float32), image.spacing, d.spacing)
        return self._prepare(array, name=str(image.path or "the image")), resample

    def predict_image_proba(self, image: Image) -> np.ndarray:
        """Class (or region) probabilities (K, *S) float32 for an :class:`useg.io.Image`, in its geometry."""
        x, resample = self._image_input(image)
        probs = predict_probs(self.model, x, self.plan, self.device, self.precision, fn=self._fn())
        if resample:
            from .resample import resample_probs

            probs = resample_probs(probs, image.spatial_shape)
        return probs

    def predict_image(self, image: Image) -> np.ndarray:
        """Class indices (*S) for an :class:`useg.io.Image`, in the image's own geometry.

        A plan trained at another spacing (``plan.data.resample``) sees the image resampled to
        that spacing, and the labels come back to the image's grid by nearest neighbour.
        """
        from .resample import largest_component, resample_labels

        x, resample = self._image_input(image)
        labels = predict_labels(self.model, x, self.plan, self.device, self.precision, fn=self._fn())
        if resample:
            labels = resample_labels(labels, image.spatial_shape)
        if self.plan.infer.largest_component:
            labels = largest_component(labels)
        return labels.astype(np.int64)

    def predict_files(
        self,
        inputs: Sequence[str | Path | Case],
        out_dir: str | Path,
        overwrite: bool = False,
        progress: Callable[[Path], None] | None = None,
        instances: bool = False,
        probabilities: str | None = None,
        watershed: bool = False,
    ) -> list[Path]:
        """Predict each input file and write its mask into ``out_dir`` in the training masks' encoding.

        Output names are the case names or input stems (never a path outside ``out_dir``) with the
        input's suffix for PNG/TIFF/NIfTI, ``.nii.gz`` for DICOM series and ``.png`` otherwise.
        Inputs are files, DICOM series folders or :class:`useg.dataset.Case` objects (several
        channel files). Existing outputs are refused unless ``overwrite``.

        With ``instances`` the masks hold object ids (connected components of class 1,
        :func:`useg.instances.label_instances`, split further by a seeded watershed with
        ``watershed``) instead of classes. With ``probabilities`` ("float16", or "uint8" as
        probability x 255) the class probabilities are written instead, as ``<name>_probs.tif``
        (K, *S) or, for volumes, ``<name>_probs.nii.gz`` (*S, K).

        Returns:
            The written paths, in input order.
        """
        out_dir = Path(out_dir)
        if probabilities not in (None, "float16", "uint8"):
            raise ValueError(f"probabilities must be float16 or uint8, not {probabilities!r}")
        passes = len(symmetries(self.plan, (1, 1, *self.plan.infer.tile)))
        if passes > 1:
            logger.info("test-time augmentation: %d forward passes per tile, about %dx the time of plain "
                        "prediction%s", passes, passes, " on a CPU" if self.device.type == "cpu" else "")
        cases = [c if isinstance(c, Case) else Case(stem_of(c), Path(c)) for c in inputs]
        targets = _output_paths(cases, out_dir, overwrite, probabilities is not None)

        def write(target: Path, labels: np.ndarray, image: Image) -> Path:
            if probabilities:
                return write_probabilities(target, labels, image, probabilities)
            if instances:
                return write_mask(target, label_instances(labels, object_class=1, watershed=watershed), like=image)
            return write_mask(target, labels, like=image, label_map=self.plan.data.label_map)

        # Reading the next file and writing the last mask overlap with the network's work on this
        # one (file I/O and compression release the GIL); at most one read and one write are queued.
        written: list[Path] = []
        with ThreadPoolExecutor(max_workers=2) as pool:
            reading = pool.submit(read_case_image, cases[0].files) if cases else None
            writing = None
            for i, (c, target) in enumerate(zip(cases, targets)):
                image = reading.result()
                reading = pool.submit(read_case_image, cases[i + 1].files) if i + 1 < len(cases) else None
                labels = self.predict_image_proba(image) if probabilities else self.predict_image(image)
                if writing is not None:
                    written.append(writing.result())
                writing = pool.submit(write, target, labels, image)
                if progress is not None:
                    progress(c.image)
            if writing is not None:
                written.append(writing.result())
        return written


def _output_paths(cases: Sequence[Case], out_dir: Path, overwrite: bool, probabilities: bool) -> list[Path]:
    """One output per case inside ``out_dir``; clashes and existing files are refused up front."""
    targets: list[Path] = []
    for c in cases:
        suffix = MASK_OUT_SUFFIX.get(suffix_of(c.image), ".nii.gz" if c.image.is_dir() else ".png")
        if probabilities:
            suffix = "_probs" + (".nii.gz" if suffix in (".nii", ".nii.gz") else ".tif")
        # no separators in the name, so whatever the input names, the output stays in out_dir
        target = out_dir / (c.name.replace("/", "_").replace("\\", "_") + suffix)
        if target in targets:
            raise UsegError(f"{c.image} and another input both map to {target.name}; rename one of them")
        if target.exists() and not overwrite:
            raise UsegError(f"{target} already exists; pass --overwrite or choose another --out")
        targets.append(target)
    return targets


def write_probabilities(path: Path, probs: np.ndarray, like: Image, dtype: str = "float16") -> Path:
    """Write (K, *S) probabilities atomically: float16, or uint8 as round(p * 255).

    TIFF holds (K, *S) with the image's resolution; NIfTI (for volumes) holds (*S, K) with the
    image's affine, the channel last as NIfTI's 4th axis.
    """
    from .io import _write_tiff, atomic_path

    data = probs.astype(np.float16) if dtype == "float16" else np.round(np.clip(probs, 0, 1) * 255).astype(np.uint8)
    if suffix_of(path) in (".nii", ".nii.gz"):
        import nibabel as nib

        affine = like.affine if like.affine is not None else np.diag([*(list(like.spacing) + [1.0] * 3)[:3], 1.0])
        arr = np.moveaxis(data.astype(np.float32) if dtype == "float16" else data, 0, -1)  # NIfTI has no float16
        with atomic_path(path) as tmp:
            nib.save(nib.Nifti1Image(arr, affine), str(tmp))
        return path
    with atomic_path(path) as tmp:
        _write_tiff(tmp, data, like, rgb=False)
    return path

