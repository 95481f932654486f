"""Plots and the HTML report: training curves, overlays of predictions on images, report.html.

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg),
never pyplot: no window, no global figure state, safe in worker processes. Every file is written
under a temporary name and renamed, so a crash never leaves half a file behind.
"""

from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np

from .files import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

# class colours for overlays (class 0, background, is never painted)
CLASS_COLOURS = np.array([[0, 0, 0], [230, 57, 70], [42, 157, 143], [233, 196, 106], [69, 123, 157],
                          [244, 162, 97], [131, 56, 236], [58, 134, 255]], np.float32) / 255.0


def _save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path


def _points(records: Sequence[dict], key: str) -> list[tuple[float, float]]:
    """(epoch, value) pairs for records that hold a finite number under ``key``."""
    pts = []
    for i, r in enumerate(records):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            e = r.get("epoch")
            pts.append((float(e) if isinstance(e, (int, float)) else float(i + 1), float(v)))
    return pts


def plot_curves(records: Sequence[dict], path: str | Path) -> Path:
    """Training curves: losses (and the learning rate) per epoch, and the validation Dice.

    Args:
        records: metrics.jsonl records; each may hold ``epoch``, ``train_loss``, ``val_loss``,
            ``val_dice``, ``lr`` and ``seconds``. Missing or non-finite values are skipped; a
            record without ``epoch`` counts as its 1-based position.
        path: the PNG to write.

    Returns:
        ``path`` as a Path.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    losses = {k: _points(records, k) for k in ("train_loss", "val_loss")}
    for key, name in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        if losses[key]:
            ax1.plot(*zip(*losses[key]), marker=".", label=name)
    values = [v for pts in losses.values() for _, v in pts]
    if values and min(values) > 0:  # log scale shows late progress, but only for positive losses
        ax1.set_yscale("log")
    lr = _points(records, "lr")
    if lr:
        ax_lr = ax1.twinx()
        ax_lr.plot(*zip(*lr), color="grey", linestyle="--", linewidth=1, label="learning rate")
        ax_lr.set_ylabel("learning rate", color="grey")
    if values:
        ax1.legend(loc="upper right")
    else:
        ax1.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax1.transAxes)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.grid(alpha=0.3)

    dice = _points(records, "val_dice")
    if dice:
        ax2.plot(*zip(*dice), marker=".", color="tab:green")
        best = max(dice, key=lambda p: p[1])
        ax2.annotate(f"best {best[1]:.3f} (epoch {best[0]:g})", best, textcoords="offset points",
                     xytext=(0, -18), ha="right")
    else:
        ax2.text(0.5, 0.5, "no validation Dice recorded", ha="center", va="center", transform=ax2.transAxes)
    seconds = _points(records, "seconds")
    total = sum(v for _, v in seconds)
    ax2.set_title(f"{len(records)} epochs, {total / 60:.1f} min" if seconds else f"{len(records)} epochs")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation Dice (foreground)")
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    return _save_figure(fig, Path(path))


def _display(image: np.ndarray) -> np.ndarray:
    """(C, H, W) or (H, W) -> (H, W) grey or (H, W, 3) RGB in [0, 1], robust to outliers."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = np.moveaxis(img, 0, -1) if img.shape[0] == 3 else img[0]
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return np.zeros(img.shape, np.float32)
    lo, hi = np.percentile(finite, (0.5, 99.5))
    out = (np.nan_to_num(img, nan=lo) - lo) / max(float(hi - lo), 1e-8)
    return np.clip(out, 0.0, 1.0)


def _blend(base: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Paint classes > 0 as translucent colours over a grey or RGB image in [0, 1]."""
    rgb = np.repeat(base[..., None], 3, -1) if base.ndim == 2 else base
    labels = np.asarray(labels).astype(np.int64)
    # colours cycle past the table, skipping background's black
    colours = CLASS_COLOURS[np.where(labels > 0, (labels - 1) % (len(CLASS_COLOURS) - 1) + 1, 0)]
    on = (labels > 0)[..., None]
    return np.where(on, (1 - alpha) * rgb + alpha * colours, rgb)


def save_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None, path: str | Path,
                 title: str = "") -> Path:
    """Image | prediction overlay | truth overlay, side by side, as a PNG.

    Args:
        image: (H, W) or (C, H, W); shown as RGB when C == 3, else channel 0; scaled to its
            0.5-99.5 percentiles for display.
        pred: (H, W) class indices; classes > 0 are painted as translucent colours.
        truth: (H, W) class indices, or None for no truth panel.
        path: the PNG to write.
        title: shown above the panels.

    Returns:
        ``path`` as a Path.
    """
    from matplotlib.figure import Figure

    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (C, H, W), got shape {image.shape}")
    size = image.shape[-2:]
    for name, arr in (("pred", pred), ("truth", truth)):
        if arr is not None and np.shape(arr) != size:
            raise ValueError(f"{name} has shape {np.shape(arr)} but the image is {size}")
    base = _display(image)
    panels = [("image", base), ("prediction", _blend(base, pred))]
    if truth is not None:
        panels.append(("truth", _blend(base, truth)))
    fig = Figure(figsize=(3.6 * len(panels), 3.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (name, arr) in zip(axes, panels):
        ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save_figure(fig, Path(path))


def _href(target: Path, out_dir: Path) -> str:
    """A URL for ``target`` relative to ``out_dir``, percent-encoded (spaces, '#', '?')."""
    try:
        rel = os.path.relpath(target.resolve(), out_dir.resolve())
    except ValueError:  # another drive on Windows: no relative path exists
        return target.resolve().as_uri()
    return quote(Path(rel).as_posix())


def write_report(out_dir: str | Path, title: str, summary_table: str, images: Sequence[str | Path],
                 extra: dict | None = None) -> Path:
    """Write ``out_dir/report.html``: the summary table, key facts and the given figures.

    The page has inline style and no scripts; figures are linked by paths relative to
    ``out_dir`` so the folder can be moved as a whole. Images that do not exist are left out
    with a warning. All text is HTML-escaped.

    Args:
        out_dir: the folder for report.html (created if missing).
        title: page title and heading.
        summary_table: preformatted text (e.g. the metrics table), shown in <pre>.
        images: figure files (PNG) to show, in order.
        extra: key/value facts shown as a small table, or None.

    Returns:
        The path of report.html.
    """
    out_dir = Path(out_dir)
    rows = "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                     for k, v in (extra or {}).items())
    facts = f"<h2>Details</h2>\n<table>\n{rows}\n</table>" if rows else ""
    figs = []
    for p in map(Path, images):
        if not p.exists():
            logger.warning("report: %s does not exist; left out of the report", p)
            continue
        src, name = html.escape(_href(p, out_dir)), html.escape(p.stem)
        figs.append(f'<figure><a href="{src}"><img src="{src}" alt="{name}"></a>'
                    f"<figcaption>{name}</figcaption></figure>")
    figures = "<h2>Figures</h2>\n" + "\n".join(figs) if figs else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}img{{max-width:100%}}
table{{border-collapse:collapse}}th,td{{padding:2px 10px;text-align:left;border-bottom:1px solid #ddd}}
pre{{background:#f6f6f6;padding:1em;overflow-x:auto}}figure{{margin:1em 0}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Summary</h2>
<pre>{html.escape(summary_table)}</pre>
{facts}
{figures}
</body></html>
"""
    return atomic_write_text(out_dir / "report.html", page)
