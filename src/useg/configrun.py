"""A multi-configuration run as prediction sees it: which configuration(s) ``configuration.json`` chose,
and the ensemble of a 2D-on-slices and a 3D network (the mean of their probabilities per image).

``useg train DATA --out RUN --configs 2d,3d`` (:func:`useg.configs.train_configurations`) writes::

    RUN/configs.json        what was asked: the configurations, the folds, the shared validation cases
    RUN/2d/, RUN/3d/        a complete run (or cross-validated run) per configuration
    RUN/validation/NAME/    the validation predictions each candidate was scored on
    RUN/configuration.json  the candidates' scores, the chosen configuration(s), the rule (written last)

:meth:`useg.predict.Segmenter.load` asks :func:`chosen_runs` which sub-runs to load: one is loaded
as it is (a cross-validated one as its fold ensemble, with its own post-processing), two become a
:class:`ConfigEnsemble`. The two networks have different tiles (a 2D one on slices, a 3D one), so they
are combined per image, not per tile as :class:`useg.backends.EnsembleBackend` combines folds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import writing
from .errors import UsegError
from .files import Image
from .labels import regions_to_labels
from .runlog import CHOICE_FILE, CONFIGS_FILE, is_multi_configuration, refuse_unloadable
from .spec import CONFIGURATIONS

logger = logging.getLogger(__name__)

ENSEMBLE = "+".join(CONFIGURATIONS)  # the candidate name of the ensemble of the two configurations


def _sentence(path: Path, why: str) -> str:
    return (f"{path} is not a configuration record of 'useg train --configs' ({why}); delete it and run "
            f"'useg train DATA --out {path.parent} --resume' to choose again")


def read_choice(run: str | Path) -> dict:
    """``RUN/configuration.json``, checked: its ``chosen`` names one or two trained configurations.

    Raises:
        UsegError: the record is missing (training not complete), unreadable or malformed.
    """
    run = Path(run)
    path = run / CHOICE_FILE
    if not path.is_file():
        raise UsegError(f"{run} is a multi-configuration run whose training is not complete (no "
                        f"{CHOICE_FILE}); continue it with 'useg train DATA --out {run} --resume', or "
                        "predict with one configuration: --configs 2d or --configs 3d")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsegError(_sentence(path, str(e) or type(e).__name__)) from None
    chosen = record.get("chosen") if isinstance(record, dict) else None
    if (not isinstance(chosen, list) or not 1 <= len(chosen) <= len(CONFIGURATIONS)
            or any(c not in CONFIGURATIONS for c in chosen) or len(set(chosen)) != len(chosen)):
        raise UsegError(_sentence(path, f"'chosen' must list one or two of {', '.join(CONFIGURATIONS)}"))
    return record


def chosen_runs(run: str | Path, configuration: str | None = None) -> list[Path] | None:
    """The sub-runs a multi-configuration run predicts with; None for any other run.

    Args:
        run: a run folder.
        configuration: one of :data:`useg.spec.CONFIGURATIONS` to predict with that one alone
            (``useg predict --configs 2d``); None takes ``configuration.json``'s choice.

    Raises:
        UsegError: ``configuration`` for a run that is not a multi-configuration one, or one it did not
            train; a missing or damaged ``configuration.json``.
    """
    run = Path(run)
    if not is_multi_configuration(run):
        if configuration is not None:
            refuse_unloadable(run)  # a missing folder or no run at all is the real cause, said first
            raise UsegError(f"{run} is not a multi-configuration run (it has no {CONFIGS_FILE} of "
                            "'useg train --configs 2d,3d'); drop --configs")
        return None
    if configuration is not None:
        if configuration not in CONFIGURATIONS or not (run / configuration).is_dir():
            raise UsegError(f"{run} holds no configuration {configuration!r}; choose one of "
                            f"{', '.join(c for c in CONFIGURATIONS if (run / c).is_dir())}")
        return [run / configuration]
    return [run / c for c in read_choice(run)["chosen"]]


def describe_choice(run: str | Path) -> list[str]:
    """Lines for ``useg info RUN``: each candidate's mean foreground Dice and the choice."""
    record = read_choice(run)
    lines = [f"configurations ({Path(run) / CHOICE_FILE}, {record.get('scored_on', 'validation cases')}):"]
    for name, score in record.get("candidates", {}).items():
        mark = "  chosen" if name == "+".join(record["chosen"]) else ""
        classes = ", ".join(f"{k} {v:.4f}" for k, v in score.get("classes", {}).items())
        lines.append(f"  {name:<6} foreground dice {score.get('dice', float('nan')):.4f} ({classes}){mark}")
    lines.append(f"  rule: {record.get('rule', '')}")
    return lines


class ConfigEnsemble:
    """The mean of several Segmenters' probabilities per image (in its geometry), then argmax or regions.

    It has what :func:`useg.writing.predict_files` and the command line use of a
    :class:`useg.predict.Segmenter` (``plan``, ``backend``, ``predict``, ``predict_proba``,
    ``predict_image``, ``predict_image_proba``, ``predict_files``). Memory: the running sum and one
    member's probabilities, two (K, *S) float32 arrays. No post-processing is applied: each member's
    ``postprocessing.json`` was chosen on that member's predictions, not on the ensemble's.

    Args:
        members: Segmenters of the same labels (label map, regions); the plan of the one with the most
            dimensions (the 3D network) is the ensemble's (label map, mask format, channels).
    """

    postprocessing = None

    def __init__(self, members: Sequence):
        if len(members) < 2:
            raise ValueError("a configuration ensemble needs at least two members")
        first = members[0].plan.data
        for m in members[1:]:
            d = m.plan.data
            if (d.label_map, d.regions, d.channel_names) != (first.label_map, first.regions,
                                                             first.channel_names):
                raise UsegError("the configurations of this run were trained on other labels or channels; "
                                "predict with one of them (--configs 2d or --configs 3d)")
        self.members = list(members)
        self._plan = max(self.members, key=lambda m: m.plan.model.dims).plan
        self.backend = self.members[0].backend

    @property
    def plan(self):
        """The representative plan; setting it passes its test-time augmentation on to every member."""
        return self._plan

    @plan.setter
    def plan(self, plan) -> None:
        self._plan = plan
        for m in self.members:
            m.plan = dataclasses.replace(m.plan, infer=dataclasses.replace(m.plan.infer, tta=plan.infer.tta))

    @property
    def num_classes(self) -> int:
        return self._plan.model.num_classes

    def _mean(self, each) -> np.ndarray:
        total = None
        for m in self.members:  # one member's probabilities beside the sum at a time
            probs = np.asarray(each(m), dtype=np.float32)
            total = probs if total is None else np.add(total, probs, out=total)
        total /= len(self.members)
        return total

    def _labels(self, probs: np.ndarray) -> np.ndarray:
        regions = self._plan.data.regions
        return regions_to_labels(probs, regions) if regions else probs.argmax(0)

    def predict_proba(self, array: np.ndarray, progress=None) -> np.ndarray:
        """(K, *S) float32: the members' :meth:`useg.predict.Segmenter.predict_proba`, averaged."""
        return self._mean(lambda m: m.predict_proba(array))

    def predict(self, array: np.ndarray, progress=None) -> np.ndarray:
        """(*S) int64 class indices of the averaged probabilities."""
        return self._labels(self.predict_proba(array)).astype(np.int64)

    def predict_image_proba(self, image: Image) -> np.ndarray:
        """(K, *S) float32 in the image's geometry: each member resamples its own back first."""
        return self._mean(lambda m: m.predict_image_proba(image))

    def predict_image(self, image: Image) -> np.ndarray:
        """(*S) int64 class indices in the image's geometry (``plan.infer.largest_component`` applied)."""
        labels = self._labels(self.predict_image_proba(image))
        if self._plan.infer.largest_component:
            from .resample import largest_component

            labels = largest_component(labels)
        return labels.astype(np.int64)

    def postprocess(self, labels: np.ndarray) -> np.ndarray:
        """The ensemble applies no post-processing: ``labels`` unchanged."""
        return labels

    def predict_files(self, inputs, out_dir, **kwargs) -> list[Path]:
        """As :meth:`useg.predict.Segmenter.predict_files` (the same keyword arguments)."""
        return writing.predict_files(self, inputs, out_dir, **kwargs)


def report_dims(report) -> int:
    """A checked data folder's spatial dimensions (a :class:`useg.dataset.CheckReport`), from its first
    case's record; 3 when no image was readable (the check has refused that already)."""
    return len(report.records[0].shape) if report.records else 3


def refuse_unfit(dims: int, configurations: Sequence[str | None], data: str | Path) -> None:
    """A 3D network needs volumes: "3d" is refused for 2D images.

    Args:
        dims: the data's spatial dimensions (2 or 3).
        configurations: the configurations asked for (None entries mean the planner's choice).
        data: the data folder, named in the sentence.

    >>> refuse_unfit(3, ["2d", "3d"], "data")
    >>> refuse_unfit(2, [None], "data")
    """
    if dims == 2 and "3d" in configurations:
        raise UsegError(f"{data} holds 2D images, for which there is no 3D configuration; drop 3d from "
                        "--configs (2D images train the 2d configuration)")


__all__ = ["ENSEMBLE", "ConfigEnsemble", "chosen_runs", "report_dims", "describe_choice", "read_choice",
           "refuse_unfit"]
