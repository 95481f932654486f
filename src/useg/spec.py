"""What the user says about a data folder and a plan: one :class:`DataSpec`, one :class:`Overrides`.

Both travel unchanged from the command line (or :func:`useg.pipeline.train_folder`) through the
check (:func:`useg.check.check_dataset`) and the planner (:func:`useg.planner.plan_dataset`), so
no layer in between repeats their fields as keyword arguments. A leaf: it imports no useg module.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _tuple(values: Sequence | None, what: str) -> tuple | None:
    if values is None:
        return None
    if isinstance(values, str):
        raise ValueError(f"{what} must be a sequence, not the string {values!r}")
    return tuple(values)


@dataclass(frozen=True)
class DataSpec:
    """How to read a data folder, where its files and masks do not say it themselves.

    Sequences are stored as tuples; None everywhere reads the folder as found.
    """

    mask_values: tuple[int, ...] | None = None  # the masks' stored values (--labels); None infers them
    channel_names: tuple[str, ...] | None = None  # case folders: channel file prefixes in order (--channels)
    label_name: str | None = None  # case folders: the label file-name prefix (--label)
    image_pattern: str | None = None  # image stem around {stem}, e.g. {stem}_img (--image-pattern)
    mask_pattern: str | None = None  # mask stem around {stem}, e.g. {stem}_seg (--mask-pattern)
    roi_dir: str | Path | None = None  # a region-of-interest mask per image (--roi): labels valid inside

    def __post_init__(self) -> None:
        values = _tuple(self.mask_values, "mask_values")
        object.__setattr__(self, "mask_values", None if values is None else tuple(int(v) for v in values))
        names = _tuple(self.channel_names, "channel_names")
        object.__setattr__(self, "channel_names", names or None)  # no prefixes means none were given


# nnU-Net's configuration names: "2d" trains a 2D network (on the slices of volumes), "3d" a 3D network
CONFIGURATIONS = ("2d", "3d")


@dataclass(frozen=True)
class Overrides:
    """The choices the user fixed; each wins over the preset and the planner.

    The field dicts are copied on construction; treat them as read-only.
    """

    preset: str = "default"  # the named recipe the plan starts from (useg.planner.PRESETS)
    model: Mapping[str, Any] = field(default_factory=dict)  # ModelConfig fields
    train: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig fields
    infer: Mapping[str, Any] = field(default_factory=dict)  # InferConfig fields
    data: Mapping[str, Any] = field(default_factory=dict)  # DataConfig fields
    patch_size: tuple[int, ...] | None = None  # the training patch (rounded up to a size the network accepts)
    memory_gb: float | None = None  # the planner's training memory budget; None: from the machine
    regions: Mapping[str, tuple[int, ...]] | None = None  # nested regions in mask values, outer to inner
    # "2d" or "3d" (CONFIGURATIONS; volumes as 2D slices or 3D patches); None: the planner's choice
    configuration: str | None = None

    def __post_init__(self) -> None:
        for name in ("model", "train", "infer", "data"):
            object.__setattr__(self, name, dict(getattr(self, name) or {}))
        if self.patch_size is not None:
            patch = tuple(int(p) for p in _tuple(self.patch_size, "patch_size"))
            object.__setattr__(self, "patch_size", patch)
        if self.regions is not None:
            object.__setattr__(self, "regions", {k: tuple(v) for k, v in dict(self.regions).items()})
        if self.configuration is not None and self.configuration not in CONFIGURATIONS:
            raise ValueError(f"configuration must be one of {CONFIGURATIONS}, got {self.configuration!r}")


@dataclass(frozen=True)
class Bound:
    """The values one numeric field takes: the one rule the command line and the plan both apply.

    The parser (:mod:`useg.cli`) refuses what :meth:`below` says with ``what`` (a value of no sign
    or kind the field could take); every plan (:mod:`useg.plan`) refuses what :meth:`holds` does
    not, naming the field and its flag.
    """

    whole: bool  # whole numbers only
    low: float  # the smallest value (or its exclusive bound, without low_ok)
    what: str  # the values in words, for the parser: "a number in [0, 1)"
    low_ok: bool = True  # low itself is allowed
    high: float = math.inf  # exclusive upper bound

    def below(self, value: Any) -> bool:
        """Not finite, or under the lower bound (the parser's share of the rule).

        >>> BOUNDS["lr"].below(0.0), BOUNDS["dropout"].below(1.5)
        (True, False)
        """
        return not math.isfinite(value) or value < self.low or (value == self.low and not self.low_ok)

    def holds(self, value: Any) -> bool:
        """Of the right kind and within both bounds.

        >>> BOUNDS["dropout"].holds(0.5), BOUNDS["dropout"].holds(1.0), BOUNDS["width"].holds(True)
        (True, False, False)
        """
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.whole else numbers.Real):
            return False
        return not self.below(value) and value < self.high


COUNT = Bound(True, 1, "a whole number >= 1")  # the rule of every size and count
BOUNDS = {  # plan field -> its rule; the command-line flags of these fields parse with them
    "width": COUNT,
    "depth": COUNT,
    "dropout": Bound(False, 0.0, "a number in [0, 1)", high=1.0),
    "lr": Bound(False, 0.0, "a positive number", low_ok=False),
    # numpy and torch both take 32-bit seeds (torch up to 64: seed + rank stays inside)
    "seed": Bound(True, 0, "a whole number from 0 to 4294967295", high=2**32),
    "workers": Bound(True, -1, "a whole number >= 0, or -1 for automatic"),
    "epochs": Bound(True, 1, "a whole number of at least 1"),
    "iters_per_epoch": Bound(True, 1, "a whole number of at least 1"),
    "batch_size": Bound(True, 1, "a whole number of at least 1"),
}
