"""Plots and the HTML report: training curves, overlays of predictions on images, report.html.

matplotlib with the Agg backend (no screen needed); every file is written to a temporary name
and renamed.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .io import atomic_path

os.environ.setdefault("MPLBACKEND", "Agg")

CLASS_COLOURS = np.array([[0, 0, 0], [230, 57, 70], [42, 157, 143], [233, 196, 106], [69, 123, 157],
                          [244, 162, 97], [131, 56, 236], [58, 134, 255]], np.float32) / 255.0


def _figure(*args, **kw):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, plt.subplots(*args, **kw)


def _save(fig, plt, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_curves(records: Sequence[dict], path: str | Path) -> Path:
    """Training loss (and validation loss) and validation Dice per epoch.

    Args:
        records: metrics.jsonl records with ``epoch``, ``train_loss`` and optionally ``val_loss``,
            ``val_dice``, ``lr``.
        path: the PNG to write.
    """
    plt, (fig, (ax1, ax2)) = _figure(1, 2, figsize=(10, 3.6))
    epochs = [r.get("epoch", i) for i, r in enumerate(records)]
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation cross-entropy")):
        pts = [(e, r[key]) for e, r in zip(epochs, records) if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), marker=".", label=label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    ax1.legend(loc="upper right")
    ax1.grid(alpha=0.3)
    pts = [(e, r["val_dice"]) for e, r in zip(epochs, records) if r.get("val_dice") is not None]
    if pts:
        ax2.plot(*zip(*pts), marker=".", color="tab:green")
        best = max(pts, key=lambda p: p[1])
        ax2.annotate(f"best {best[1]:.3f}", best, textcoords="offset points", xytext=(-40, -15))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation Dice (foreground)")
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    return _save(fig, plt, Path(path))


def _display(image: np.ndarray) -> np.ndarray:
    """(C, H, W) or (H, W) -> (H, W) or (H, W, 3) in [0, 1], robust to outliers."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = np.moveaxis(img[:3], 0, -1) if img.shape[0] == 3 else img[0]
    lo, hi = np.percentile(img, (0.5, 99.5))
    return np.clip((img - lo) / max(hi - lo, 1e-8), 0, 1)


def _blend(grey: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    rgb = np.repeat(grey[..., None], 3, -1) if grey.ndim == 2 else grey.copy()
    colours = CLASS_COLOURS[np.asarray(labels) % len(CLASS_COLOURS)]
    on = (np.asarray(labels) > 0)[..., None]
    return np.where(on, (1 - alpha) * rgb + alpha * colours, rgb)


def save_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None, path: str | Path,
                 title: str = "") -> Path:
    """Image | prediction overlay | truth overlay, side by side.

    Args:
        image: (C, H, W) or (H, W).
        pred: (H, W) class indices.
        truth: (H, W) class indices, or None.
        path: the PNG to write.
        title: shown above the panels.
    """
    base = _display(image)
    panels = [("image", base), ("prediction", _blend(base, pred))]
    if truth is not None:
        panels.append(("truth", _blend(base, truth)))
    plt, (fig, axes) = _figure(1, len(panels), figsize=(3.6 * len(panels), 3.8))
    for ax, (name, arr) in zip(np.atleast_1d(axes), panels):
        ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, plt, Path(path))


def write_report(out_dir: str | Path, title: str, summary_table: str, images: Sequence[str | Path],
                 extra: dict | None = None) -> Path:
    """``out_dir/report.html``: the metrics table, key facts and the given plots, linked relatively."""
    out_dir = Path(out_dir)
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in (extra or {}).items())
    figs = "".join(
        f'<figure><img src="{html.escape(os.path.relpath(Path(p), out_dir))}" alt="{html.escape(Path(p).stem)}">'
        f"<figcaption>{html.escape(Path(p).stem)}</figcaption></figure>"
        for p in images if Path(p).exists()
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}img{{max-width:100%}}
table{{border-collapse:collapse}}th,td{{padding:2px 10px;text-align:left;border-bottom:1px solid #ddd}}
pre{{background:#f6f6f6;padding:1em}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Held-out metrics</h2><pre>{html.escape(summary_table)}</pre>
<table>{rows}</table>
<h2>Figures</h2>{figs}
</body></html>
"""
    path = out_dir / "report.html"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return path
