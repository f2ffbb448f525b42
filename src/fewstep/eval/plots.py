"""Figures: digit sample grids, 2-D scatter panels and quality-vs-NFE curves.

Built on ``matplotlib.figure.Figure`` with the Agg renderer, never ``pyplot``: no display, no global figure
state. Every file is written atomically (saved to a temporary file, then moved into place); the format
follows the file's suffix (PNG when there is none).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter
from torch import Tensor

from fewstep.cache import atomic_write
from fewstep.errors import DataError

MAX_SCATTER_POINTS = 5000


def sample_grid(images: Tensor, path: str | Path, nrow: int = 8) -> None:
    """Save images ``(N, C, H, W)`` in [-1, 1] as one grid, ``nrow`` images per row."""
    grid = _image_grid(images, nrow)
    height, width = grid.shape[:2]
    fig = _figure((max(2.0, width / 12), max(2.0, height / 12)), layout=None)
    ax = fig.add_axes((0, 0, 1, 1))
    _show_grid(ax, grid)
    _save(fig, path)


def compare_grids(named_images: dict[str, Tensor | None], path: str | Path, nrow: int = 8,
                  columns: int | None = None) -> None:
    """Save one titled grid per entry, e.g. ``{"teacher (heun, 35 NFE)": x, "student (1 NFE)": y}``, in rows
    of ``columns`` panels (default: one row). A ``None`` entry leaves its place empty."""
    grids = {name: _image_grid(images, nrow) for name, images in named_images.items() if images is not None}
    if not grids:
        raise DataError("compare_grids needs at least one named image batch")
    height, width = next(iter(grids.values())).shape[:2]
    axes, fig = _panels(len(named_images), columns, (3.2, 3.2 * height / width + 0.4))
    for ax, name in zip(axes, named_images, strict=False):
        if name not in grids:
            ax.axis("off")
            continue
        _show_grid(ax, grids[name])
        ax.set_title(name, fontsize=9)
    _save(fig, path)


def scatter_2d(named_samples: dict[str, Tensor | None], path: str | Path, reference: Tensor | None = None,
               columns: int | None = None) -> None:
    """Save one scatter panel per entry of 2-D samples ``(N, 2)``, over ``reference`` points in grey if given,
    in rows of ``columns`` panels (default: one row). A ``None`` entry leaves its place empty.

    All panels share limits (the 0.5-99.5% range of the reference, or of all samples without one), so a
    student's stray samples fall outside the frame rather than shrink everyone else's picture."""
    points = {name: _points_2d(samples, name) for name, samples in named_samples.items() if samples is not None}
    if not points:
        raise DataError("scatter_2d needs at least one named sample set")
    ref = _points_2d(reference, "reference") if reference is not None else None
    bounds = ref if ref is not None else np.concatenate(list(points.values()))
    low, high = np.percentile(bounds, 0.5, axis=0), np.percentile(bounds, 99.5, axis=0)
    margin = 0.1 * (high - low).max()
    low, high = low - margin, high + margin
    axes, fig = _panels(len(named_samples), columns, (3.2, 3.4))
    for ax, name in zip(axes, named_samples, strict=False):
        if name not in points:
            ax.axis("off")
            continue
        if ref is not None:
            ax.scatter(ref[:, 0], ref[:, 1], s=1, color="0.8", rasterized=True)
        ax.scatter(points[name][:, 0], points[name][:, 1], s=1, color="C0", rasterized=True)
        ax.set_xlim(low[0], high[0])
        ax.set_ylim(low[1], high[1])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=9)
    _save(fig, path)


def _panels(count: int, columns: int | None, panel_size: tuple[float, float]) -> tuple[list, Figure]:
    """A figure of ``count`` panels in rows of ``columns`` and their axes in reading order."""
    columns = count if columns is None else max(1, min(columns, count))
    rows = math.ceil(count / columns)
    fig = _figure((panel_size[0] * columns, panel_size[1] * rows))
    axes = list(fig.subplots(rows, columns, squeeze=False).flat)
    for ax in axes[count:]:
        ax.axis("off")
    return axes[:count], fig


def quality_vs_nfe(report: dict, path: str | Path, metric: str | None = None, floor: float | None = None) -> None:
    """Save ``metric`` (default: the report's quality metric) against NFE on a log axis, one line per teacher
    sampler and per student, with the real-data noise floor as a dashed line over a shaded band.

    Students evaluated at several step counts share a line when named ``"<name>@<nfe>"``. ``floor``
    defaults to ``report["noise_floor"][metric]``."""
    metric = metric or report.get("quality_metric") or "fd"
    rows = [row for row in report["results"] if row.get(metric) is not None and math.isfinite(row[metric])]
    if not rows:
        raise DataError(f"no result in the report has a finite {metric!r} to plot")
    floor = floor if floor is not None else report.get("noise_floor", {}).get(metric)
    lines: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        label = f"teacher · {row['sampler']}" if row["role"] == "teacher" else row["name"].split("@")[0]
        lines.setdefault(label, []).append((row["nfe"], row[metric]))
    fig = _figure((5.5, 3.8))
    ax = fig.add_subplot()
    for i, (label, points) in enumerate(lines.items()):
        nfe, value = zip(*sorted(points), strict=True)
        style = "-" if label.startswith("teacher") else "--"
        ax.plot(nfe, value, style, marker="o", color=f"C{i % 10}", label=label)
    values = [row[metric] for row in rows] + ([floor] if floor is not None else [])
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    if floor is not None:
        ax.axhline(floor, ls=":", color="0.3", label="noise floor (real data)")
        bottom = ax.get_ylim()[0]
        ax.axhspan(bottom, floor, color="0.5", alpha=0.15, lw=0)
        ax.set_ylim(bottom=bottom)
    ax.set_xscale("log")
    ax.set_xticks(sorted({row["nfe"] for row in rows}))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel("FD-digits" if metric == "fd" else metric)
    ax.set_title(f"{report.get('dataset', '')} · {report.get('model', '')}".strip(" ·"), fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _image_grid(images: Tensor, nrow: int) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in [-1, 1] into one ``(rows, cols)`` or ``(rows, cols, 3)`` array in [0, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise DataError(f"images must have shape (N, 1 or 3, H, W) with N >= 1, got {tuple(images.shape)}")
    if nrow < 1:
        raise DataError(f"nrow must be at least 1, got {nrow}")
    x = ((images.detach().to("cpu", torch.float32) + 1) / 2).nan_to_num(0.0).clamp(0, 1).numpy()
    n, channels, height, width = x.shape
    cols, rows, pad = min(nrow, n), math.ceil(n / nrow), 1
    grid = np.ones((channels, rows * (height + pad) + pad, cols * (width + pad) + pad), dtype=np.float32)
    for i in range(n):
        top, left = pad + (i // cols) * (height + pad), pad + (i % cols) * (width + pad)
        grid[:, top:top + height, left:left + width] = x[i]
    return grid[0] if channels == 1 else grid.transpose(1, 2, 0)


def _show_grid(ax, grid: np.ndarray) -> None:
    ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()


def _points_2d(samples: Tensor, name: str) -> np.ndarray:
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise DataError(f"{name}: 2-D samples must have shape (N, 2), got {tuple(samples.shape)}")
    xy = samples.detach().to("cpu", torch.float64).numpy()
    xy = xy[np.isfinite(xy).all(axis=1)][:MAX_SCATTER_POINTS]
    if len(xy) == 0:
        raise DataError(f"{name}: no finite points to plot")
    return xy


def _figure(size: tuple[float, float], layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=size, dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> None:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=fig.dpi))
