"""The dataset's fingerprint: what the planner reads of a checked dataset (nnU-Net's fingerprint).

Computed from the check's per-case records (:class:`useg.check.CheckReport`), so every file is read
once, by the check: shapes, spacings, foreground intensities per channel, the share of each mask
value and of constant background. JSON-able, printed by ``useg plan`` and read
by :func:`useg.planner.plan_dataset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .check import CaseRecord, CheckReport


def pooled_intensities(records: Sequence[CaseRecord]) -> list[np.ndarray]:
    """Per channel, the foreground intensity samples of every case that has them, concatenated."""
    samples = [r.samples for r in records if r.samples is not None]
    return [np.concatenate(c) for c in zip(*samples, strict=True)] if samples else []


def fingerprint(report: CheckReport) -> dict[str, Any]:
    """The dataset's fingerprint, computed from a check's per-case records.

    Returns:
        JSON-able dict: cases, dims, channels (a count), median shape, median and per-axis range of
        spacings, per-channel foreground intensity percentiles (0.5, 50, 99.5), mean and std, the
        share of each mask value, of constant background, modality names and the layout.
    """
    records = report.records
    shapes = np.asarray([r.shape for r in records])
    spacings = np.asarray([r.spacing for r in records], dtype=np.float64)
    return {
        "cases": len(report.cases), "dims": int(shapes.shape[1]) if shapes.size else 0,
        "channels": report.num_channels, "layout": report.info.get("layout", "plain"),
        "channel_names": list(report.info.get("channel_names", [])),
        "median_shape": [int(v) for v in np.median(shapes, axis=0)] if shapes.size else [],
        "median_spacing": [round(float(v), 4) for v in np.median(spacings, axis=0)] if spacings.size else [],
        "spacing_range": [[round(float(a), 4), round(float(b), 4)]
                          for a, b in zip(spacings.min(axis=0), spacings.max(axis=0), strict=True)]
                         if spacings.size else [],
        "class_share": report.stats.get("pixel share per mask value", {}),
        "background_share": round(float(np.mean([r.background for r in records])) if records else 0.0, 4),
        "intensity": [
            {"p00_5": float(np.percentile(v, 0.5)), "p50": float(np.percentile(v, 50)),
             "p99_5": float(np.percentile(v, 99.5)), "mean": float(v.mean()), "std": float(v.std())}
            for v in pooled_intensities(records)
        ],
    }
