"""Prediction: a trained run as a :class:`Segmenter` (numpy in, numpy out; files in, files out).

A :class:`Segmenter` is a plan (pre-processing, tiling, test-time augmentation) on top of a
:class:`useg.backends.Backend` (the network on one runtime). :func:`predict_proba` and
:func:`predict_labels` tile a normalised image through any backend; :func:`check_low_precision`
writes ``run/inference.json``, which :meth:`Segmenter.load` reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import runlog, runtime, slices, writing
from .backends import BACKENDS, Backend, TorchBackend, ensemble
from .checkpoint import load_model
from .configrun import ConfigEnsemble, chosen_runs
from .dataset import Case
from .errors import UsegError
from .files import Image, atomic_write_text
from .folds import fold_runs
from .labels import regions_to_labels
from .memory import check_resample
from .model import output_size, valid_input_size
from .overlap_tile import overlap_tile, overlap_tile_labels
from .plan import Plan, data_dims
from .postprocess import Postprocessing, apply_postprocessing
from .postprocess_run import RECORD as POSTPROCESSING_RECORD
from .postprocess_run import read_postprocessing
from .preprocess import normalize
from .sliding_window import sliding_window, sliding_window_labels
from .tiling import Progress, TileFn
from .tta import symmetries, tta_average

logger = logging.getLogger(__name__)

AGREEMENT_MIN = 0.999  # share of pixels on which bf16 inference must match fp32, or fp32 is used
INFERENCE_RECORD = "inference.json"  # in a run folder: the precision check of the trained model


def tile_fn(backend: Backend, plan: Plan) -> TileFn:
    """The per-tile call of ``backend`` under the plan's test-time augmentation.

    With ``plan.infer.tta`` each tile is also predicted under the symmetries of
    :func:`useg.tta.symmetries` and the probabilities mapped back and averaged, on
    ``backend.device``; the result is (B, K, *out_tile) probabilities either way.
    """
    tta, rotate = plan.infer.tta, plan.infer.tta_rotate

    def fn(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return tta_average(backend, batch.to(backend.device), tta, rotate)

    return fn


def _same_tile(plan: Plan, spatial: tuple[int, ...]) -> tuple[int, ...]:
    # A tile larger than the image only wastes compute: shrink it to the image's valid size.
    m = plan.model
    return tuple(min(t, v) for t, v in zip(plan.infer.tile, valid_input_size(spatial, m.depth, m.padding)))


def predict_proba(backend: Backend, image: np.ndarray, plan: Plan,
                  progress: Progress | None = None) -> np.ndarray:
    """Class probabilities of a normalised image, tiled.

    Same-padding networks use a Gaussian-blended sliding window; valid-padding networks the
    paper's overlap-tile strategy with mirrored borders.

    Args:
        backend: the network on its runtime (:class:`useg.backends.TorchBackend`, ...).
        image: (C, *S) float32, already normalised (:func:`prepare`).
        plan: the run's plan (tile, overlap, padding, depth, tta).
        progress: optional callable(done, total) over tiles.

    Returns:
        (K, *S) float32 probabilities.
    """
    m, fn = plan.model, tile_fn(backend, plan)
    if plan.data.slice_axis is not None:  # a 2D network on the slices of a volume (useg.slices)
        return slices.predict_volume(fn, image, plan, backend.device, labels=False, progress=progress)
    if m.padding == "same":
        # tile starts on the pooling grid, so every tile sees the same max-pooling phase
        return sliding_window(fn, image, _same_tile(plan, image.shape[1:]), m.num_classes,
                              overlap=plan.infer.overlap, batch_size=plan.infer.batch_size, progress=progress,
                              align=2**m.depth, device=backend.device)  # blended where the network runs
    tile = tuple(plan.infer.tile)
    return overlap_tile(fn, image, tile, output_size(tile, m.depth, m.padding), m.num_classes,
                        batch_size=plan.infer.batch_size, progress=progress)


def predict_labels(backend: Backend, image: np.ndarray, plan: Plan,
                   progress: Progress | None = None) -> np.ndarray:
    """Class indices (*S) of a normalised image; same arguments as :func:`predict_proba`.

    For same padding the sliding window is streamed (:func:`useg.sliding_window.sliding_window_labels`),
    so no (K, *S) float buffer is ever held: memory is bounded by one slab of tiles. For valid
    padding each overlap-tile output tile writes its argmax directly
    (:func:`useg.overlap_tile.overlap_tile_labels`). Region plans hold (R, *S) region probabilities.
    A slice plan predicts a volume slice by slice (:func:`useg.slices.predict_volume`).
    """
    m = plan.model
    if plan.data.regions:  # region probabilities are thresholded, not arg-maxed: R channels held, R small
        return regions_to_labels(predict_proba(backend, image, plan, progress), plan.data.regions)
    fn = tile_fn(backend, plan)
    if plan.data.slice_axis is not None:
        return slices.predict_volume(fn, image, plan, backend.device, labels=True, progress=progress)
    if m.padding == "same":
        return sliding_window_labels(fn, image, _same_tile(plan, image.shape[1:]), m.num_classes,
                                     overlap=plan.infer.overlap, batch_size=plan.infer.batch_size,
                                     progress=progress, align=2**m.depth, device=backend.device)
    # overlap-tile output tiles do not overlap: each tile's argmax is final, no (K, *S) buffer
    tile = tuple(plan.infer.tile)
    return overlap_tile_labels(fn, image, tile, output_size(tile, m.depth, m.padding), m.num_classes,
                               batch_size=plan.infer.batch_size, progress=progress)


def prepare(plan: Plan, array: np.ndarray, name: str = "the array") -> np.ndarray:
    """Check an image against the plan and normalise it: (C, *S) or (*S) for one channel -> (C, *S) float32.

    Raises:
        UsegError: wrong dimensions or channel count, NaN or infinite values.
    """
    m, d, dims = plan.model, plan.data, data_dims(plan)  # a slice plan reads volumes
    array = np.asarray(array)
    if array.ndim == dims and m.in_channels == 1:
        array = array[None]
    if d.slice_axis is not None and array.ndim == 2:
        raise UsegError(_dims_sentence(name, 2, array.shape, 2, slices=True))
    if array.ndim != dims + 1:
        axes = f"(C, {'D, ' if dims == 3 else ''}H, W) with C={m.in_channels}"
        if array.ndim in (3, 4) and array.ndim - 1 != dims and array.shape[0] == m.in_channels:
            # channels first already: the dimensions differ, not the axis order
            raise UsegError(_dims_sentence(name, array.ndim - 1, array.shape[1:], dims,
                                           slices=d.slice_axis is not None))
        raise UsegError(f"{name} has shape {array.shape}, but the model expects {axes}; give channels first")
    if array.shape[0] != m.in_channels:
        raise UsegError(
            f"{name} has {array.shape[0]} channels but the model was trained on {m.in_channels}; "
            "give images like the training images"
        )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise UsegError(f"{name} contains NaN or infinite values; fix or mask them before predicting")
    return normalize(array, d.normalization, d.intensity)  # float32 copy, the input is untouched


def _dims_sentence(name: str, dims: int, shape: Sequence[int], run_dims: int, slices: bool = False) -> str:
    """"X is a 3D volume (16x16x16) but this run is 2D ...": the real cause, not the axis order."""
    if slices and dims == 2:  # a 2D network, but trained on volumes: a 2D image is not what it learned
        return (f"{name} is a 2D image ({'x'.join(map(str, shape))}) but this run was trained on the 2D "
                "slices of 3D volumes; predict 3D volumes with it, or train a run on 2D images")
    what = {2: "a 2D image", 3: "a 3D volume"}
    trained = {2: "2D images", 3: "3D volumes"}
    fix = ("predict it with a run trained on 3D volumes, or save its slices as 2D images" if dims == 3
           else "predict it with a run trained on 2D images")
    return (f"{name} is {what[dims]} ({'x'.join(map(str, shape))}) but this run is {run_dims}D (trained on "
            f"{trained[run_dims]}); {fix}")


def check_low_precision(plan: Plan, run: Path, images: Sequence[np.ndarray], device: torch.device,
                        max_images: int = 2) -> dict:
    """Compare the trained model's labels under the inference fast path (bf16) and fp32.

    Writes ``run/inference.json`` with the agreement and the precision :meth:`Segmenter.load`
    uses when asked for "auto" (:func:`recorded_precision`): the fast path when at least
    :data:`AGREEMENT_MIN` of the pixels agree, else fp32. Nothing is written when the fast path
    is fp32 anyway.

    Args:
        plan: the run's plan.
        run: the run folder, with ``model.safetensors``.
        images: (C, *S) float32 normalised images (validation images, say); the first
            ``max_images`` are compared, cropped to at most two tiles per axis.
        device: where inference will run.

    Returns:
        The written record (empty when there was nothing to check).
    """
    fast = runtime.pick_precision(device, "auto")
    if fast.dtype is None or not images or not (run / "model.safetensors").exists():
        return {}
    model = load_model(plan.model, run / "model.safetensors")
    # at most two tiles per axis: enough pixels to judge, cheap even for large volumes
    crops = [slices.tile_crop(im, plan) for im in images[:max_images]]
    labels = {}
    for prec in (runtime.pick_precision(device, "fp32"), fast):  # one weight layout change per precision
        net = model.to(device, memory_format=runtime.memory_format(plan.model.dims, prec)).eval()
        backend = TorchBackend(net, plan, device, prec)
        labels[prec.name] = [predict_labels(backend, im, plan) for im in crops]
    agreement = label_agreement(labels["fp32"], labels[fast.name])
    record = {"fast_path": fast.name, "agreement": round(agreement, 6), "threshold": AGREEMENT_MIN,
              "precision": fast.name if agreement >= AGREEMENT_MIN else "fp32"}
    if record["precision"] == "fp32":
        logger.warning("%s inference agrees with fp32 on only %.4f of the pixels; predictions will use fp32",
                       fast.name, agreement)
    atomic_write_text(run / INFERENCE_RECORD, json.dumps(record, indent=2) + "\n")
    return record


def label_agreement(reference: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float:
    """Share of pixels on which ``labels`` equal ``reference`` (arrays of equal shapes, pairwise).

    The test of every fast path against fp32 (:data:`AGREEMENT_MIN`): bf16 here, each backend
    candidate in :mod:`useg.autotune`.

    >>> label_agreement([np.array([0, 1, 1, 0])], [np.array([0, 1, 0, 0])])
    0.75
    """
    same = sum(int((a == b).sum()) for a, b in zip(reference, labels))
    return same / max(sum(a.size for a in reference), 1)


def recorded_precision(run: Path) -> str:
    """What precision="auto" means for ``run``: "fp32" if :func:`check_low_precision` chose it, or "auto"."""
    checked = run / INFERENCE_RECORD  # training compared the fast path with fp32 on this model
    if checked.exists():
        try:
            if json.loads(checked.read_text(encoding="utf-8")).get("precision") == "fp32":
                return "fp32"
        except (OSError, ValueError):
            pass  # an unreadable record only costs the fallback
    return "auto"


class Segmenter:
    """A trained U-Net with its pre-processing: ``Segmenter.load(run).predict(array)``.

    Args:
        plan: the run's plan (pre-processing, tiling, test-time augmentation); replace it to
            change those, e.g. ``dataclasses.replace(seg.plan, infer=...)``.
        backend: the network on its runtime, any :class:`useg.backends.Backend`;
            ``TorchBackend.place(model, plan)`` wraps a PyTorch model.
        postprocessing: applied to every label output (not to probabilities); what
            ``run/postprocessing.json`` holds when :meth:`load` read it, None for none.
    """

    def __init__(self, plan: Plan, backend: Backend, postprocessing: Postprocessing | None = None):
        self.plan, self.backend = plan, backend
        self.postprocessing = postprocessing

    @classmethod
    def load(cls, run: str | Path, device: str = "auto", precision: str = "auto",
             backend: str = "torch", postprocessing: bool = True,
             folds: Sequence[int] | None = None, configuration: str | None = None) -> Segmenter:
        """Load ``run/plan.json`` and ``run/model.safetensors`` (no pickle is ever read).

        ``backend="onnxruntime"`` runs ``run/model.onnx`` from ``useg export`` instead (CPU);
        :data:`useg.backends.BACKENDS` holds every backend. ``precision="auto"`` is fp32 where
        ``run/inference.json`` says the fast path disagreed with fp32 (:func:`check_low_precision`).
        With ``postprocessing`` the steps of ``run/postprocessing.json`` (``useg postprocess``), when
        it exists, are applied to every label output; a damaged record is refused.
        A cross-validated run (``useg train --folds``) loads as the ensemble of its folds
        (:class:`useg.backends.EnsembleBackend`, the mean of their probabilities), or of ``folds``.
        A multi-configuration run (``useg train --configs 2d,3d``) loads its chosen configuration, or
        ``configuration``; when two are chosen, a :class:`useg.configrun.ConfigEnsemble` of them.
        """
        run = Path(run)
        runlog.refuse_unloadable(run)  # no folder, no run, or one stopped before its first checkpoint
        chosen = chosen_runs(run, configuration)  # None: not a multi-configuration run
        if chosen is not None:  # the ensemble of two applies no post-processing (configrun.ConfigEnsemble)
            members = [cls.load(r, device, precision, backend, postprocessing and len(chosen) == 1, folds)
                       for r in chosen]
            return members[0] if len(members) == 1 else ConfigEnsemble(members)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (or auto, through "
                             f"useg.autotune.load_segmenter), not {backend!r}")
        members = fold_runs(run, folds)
        if members:  # each fold in the precision its own training checked
            plan, net = ensemble([BACKENDS[backend](m, device, recorded_precision(m) if precision == "auto"
                                                    else precision) for m in members], run)
        else:
            plan, net = BACKENDS[backend](run, device, recorded_precision(run) if precision == "auto"
                                          else precision)
        pp = read_postprocessing(run, plan.data.label_map.num_classes) if postprocessing else None
        if pp is not None and not pp.is_identity:
            logger.info("post-processing from %s: %s", run / POSTPROCESSING_RECORD, "; ".join(pp.describe()))
        return cls(plan, net, pp)

    @property
    def num_classes(self) -> int:
        return self.plan.model.num_classes

    def prepare(self, array: np.ndarray, name: str = "the array") -> np.ndarray:
        """:func:`prepare` with this plan: check and normalise (C, *S) or (*S) -> (C, *S) float32."""
        return prepare(self.plan, array, name)

    def predict_proba(self, array: np.ndarray,
                      progress: Progress | None = None) -> np.ndarray:
        """Class probabilities.

        Args:
            array: (C, *S) image, or (*S) for a single-channel model; any size.
            progress: optional callable(done, total) over tiles.

        Returns:
            (K, *S) float32.
        """
        return predict_proba(self.backend, self.prepare(array), self.plan, progress)

    def predict(self, array: np.ndarray, progress: Progress | None = None) -> np.ndarray:
        """Class indices (*S) int64 of an image (C, *S) or (*S) for a single-channel model, after
        :attr:`postprocessing` (region runs: on the labels decoded from the regions).

        Memory stays bounded by a slab of tiles (same padding), whatever the image size.
        """
        labels = predict_labels(self.backend, self.prepare(array), self.plan, progress)
        return self.postprocess(labels).astype(np.int64)

    def postprocess(self, labels: np.ndarray) -> np.ndarray:
        """Labels (*S) after :attr:`postprocessing` (a copy, or ``labels`` itself without steps)."""
        pp = self.postprocessing
        return labels if pp is None or pp.is_identity else apply_postprocessing(labels, pp)

    def _prepare_image(self, image: Image) -> tuple[np.ndarray, bool]:
        """The network input (C, *S') of an image at the plan's spacing, and whether it was resampled."""
        d = self.plan.data
        array = image.array
        if image.dims != data_dims(self.plan):  # before resampling: a 3D volume is no 2D image
            raise UsegError(_dims_sentence(str(image.path or "the image"), image.dims, image.spatial_shape,
                                           data_dims(self.plan), slices=d.slice_axis is not None))
        resample = d.resample and not np.allclose(image.spacing, d.spacing, rtol=1e-3)
        if resample:
            from .resample import resample_image

            # the image and its probabilities at the plan's spacing must fit before they are asked for
            check_resample(str(image.path or "the image"), image.spatial_shape, image.spacing, d.spacing,
                           array.shape[0], self.plan.model.num_classes)
            array = resample_image(array.astype(np.float32), image.spacing, d.spacing)
        return self.prepare(array, name=str(image.path or "the image")), resample

    def predict_image_proba(self, image: Image) -> np.ndarray:
        """Class (or region) probabilities (K, *S) float32 for an :class:`useg.files.Image`, in its
        geometry."""
        x, resample = self._prepare_image(image)
        probs = predict_proba(self.backend, x, self.plan)
        if resample:
            from .resample import resample_probs

            probs = resample_probs(probs, image.spatial_shape)
        return probs

    def predict_image(self, image: Image) -> np.ndarray:
        """Class indices (*S) for an :class:`useg.files.Image`, in the image's own geometry.

        A plan trained at another spacing (``plan.data.resample``) sees the image resampled to
        that spacing, and the labels come back to the image's grid by nearest neighbour.
        """
        from .resample import largest_component, resample_labels

        x, resample = self._prepare_image(image)
        labels = predict_labels(self.backend, x, self.plan)
        if resample:
            labels = resample_labels(labels, image.spatial_shape)
        if self.plan.infer.largest_component:
            labels = largest_component(labels)
        return self.postprocess(labels).astype(np.int64)

    def predict_files(
        self,
        inputs: Sequence[str | Path | Case],
        out_dir: str | Path,
        overwrite: bool = False,
        progress: Progress | None = None,
        instances: bool = False,
        probabilities: str | None = None,
        watershed: bool = False,
        roi: str | Path | None = None,
        mask_format: str | None = None,
        skip_existing: bool = False,
    ) -> list[Path]:
        """Predict each input file and write its mask into ``out_dir`` in the training masks' encoding.

        Output names are the case names or input stems (never a path outside ``out_dir``) with the
        input's suffix for PNG/TIFF/NIfTI, ``.nii.gz`` for DICOM series and ``.png`` otherwise
        (:func:`useg.writing.output_paths`). Inputs are files, DICOM series folders or
        :class:`useg.dataset.Case` objects (several channel files). Existing outputs are refused
        unless ``overwrite``.

        With ``instances`` the masks hold object ids (connected components of class 1,
        :func:`useg.instances.label_instances`, split further by a seeded watershed with
        ``watershed``) instead of classes. With ``probabilities`` ("float16", or "uint8" as
        probability x 255) the class probabilities are written instead, as ``<name>_probs.tif``
        (K, *S) or, for volumes, ``<name>_probs.nii.gz`` (*S, K). ``progress(done, total)`` is
        called after each input, the same signature as the tile progress of :meth:`predict`.
        With ``roi`` (a folder of one region-of-interest mask per input, non-zero = inside) every
        pixel outside is written as background: class 0, or foreground probabilities 0.
        ``mask_format`` ("png", "tif" or "nii.gz", :data:`useg.maskformat.MASK_FORMATS`) writes
        every mask in that format; a format that cannot hold the run's mask values or the input's
        dimensions is refused before anything is predicted (without it, masks the input's format
        cannot hold go to TIFF).
        :attr:`postprocessing` applies to the class masks before they are written, and so to the
        objects of ``instances``, cut to the ROI after it; probabilities are written as predicted.
        With ``skip_existing`` inputs whose output exists (complete: outputs appear by atomic
        rename) are skipped, the rest predicted. Under torchrun (``RANK``, ``WORLD_SIZE``) each
        process takes inputs ``RANK, RANK + WORLD_SIZE, ...`` (:mod:`useg.shards`).

        Returns:
            The paths written (by this process), in input order.
        """
        infer = self.plan.infer
        passes = len(symmetries((1, 1, *infer.tile), infer.tta, infer.tta_rotate))
        if passes > 1:
            where = " on a CPU" if self.backend.device.type == "cpu" else ""
            logger.info("test-time augmentation: %d forward passes per tile, about %dx the time of plain "
                        "prediction%s", passes, passes, where)
        return writing.predict_files(self, inputs, out_dir, overwrite=overwrite, progress=progress,
                                     instances=instances, probabilities=probabilities, watershed=watershed,
                                     roi=roi, mask_format=mask_format, skip_existing=skip_existing)
