"""PNG figures for run reports (expert importance, kept widths, quality curves, per-domain bars).

Every function takes the plain dicts / lists that a run's JSON record holds, draws one figure and
writes one PNG atomically (temp file in the same directory, then ``os.replace``), so a report
directory never holds a half-written picture even if the process dies mid-save. It returns the
``Path`` written.

Why no pyplot: these functions run inside library code and notebooks. ``pyplot`` keeps a global
figure registry and picks an (interactive) backend; using it here would leak figures, pop up
windows or switch the caller's backend. Instead each figure is a bare
:class:`matplotlib.figure.Figure` bound to a :class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`,
and no ``rcParams`` are touched: nothing global changes, and the figure is garbage-collected when
the function returns.

Block paths are strings like ``"model.layers.3.mlp"``; axes show them shortened to ``"L3"``
(see :func:`short_layer_name`). Layers are drawn in the order the dict gives them (records are
written in layer order). Figure sizes grow with the number of layers / experts within fixed
bounds, and tick labels are thinned when there are more than fit, so 64 layers x 256 experts
still gives a legible picture.

matplotlib is an optional dependency: it is imported when a function is called, and a missing
install raises ``ImportError`` with the pip command.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "domain_bars",
    "importance_heatmap",
    "kept_widths",
    "quality_curves",
    "score_distributions",
    "short_layer_name",
]

#: Resolution of every PNG: sharp enough to zoom into a 256-expert heatmap, small enough for a report.
DPI = 130
#: Base font sizes (points). Figures are sized in inches, so these stay readable at 100% zoom.
_TITLE_FS = 11
_LABEL_FS = 9
_TICK_FS = 7

_KEPT_COLOR = "#1f77b4"
_DROPPED_COLOR = "#d62728"
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")

# "model.layers.3.mlp", "transformer.h.3.moe", "blocks.3", "decoder.layer.3.ffn", "layers_3" ...
_LAYER_RE = re.compile(r"(?:^|[._])(?:layers?|blocks?|h|decoder_layers?)[._](\d+)(?=$|[._])")
# Any dotted integer component, e.g. "encoder.7.experts" -> 7.
_ANY_INT_RE = re.compile(r"(?:^|\.)(\d+)(?=$|\.)")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def short_layer_name(name: str) -> str:
    """``"model.layers.3.mlp"`` -> ``"L3"``; a name without a layer number comes back unchanged.

    Full block paths are ~20 characters and would eat most of a heatmap's width as tick labels; the
    layer number is what a reader needs. The first ``layers.N`` / ``h.N`` / ``blocks.N`` component
    wins, then the first purely numeric dotted component.
    """
    m = _LAYER_RE.search(name) or _ANY_INT_RE.search(name)
    return f"L{int(m.group(1))}" if m else name


def _layer_labels(names: Sequence[str]) -> list[str]:
    """Short labels for ``names``; names whose short label collides keep their full path.

    Two blocks in one layer (e.g. a routed and a dense MoE in the same decoder layer) must not both
    read "L3", or the reader cannot tell the rows apart.
    """
    short = [short_layer_name(n) for n in names]
    counts: dict[str, int] = {}
    for s in short:
        counts[s] = counts.get(s, 0) + 1
    return [_ellipsize(n) if counts[s] > 1 else _ellipsize(s) for n, s in zip(names, short)]


def _ellipsize(text: str, limit: int = 28) -> str:
    """Cut long fallback names from the left (the tail of a module path is the informative part)."""
    return text if len(text) <= limit else "\u2026" + text[-(limit - 1) :]


def _new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure with an Agg canvas and constrained layout (titles/labels never clipped)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "moe_fx.evaluate.report.plots needs matplotlib; install it with `pip install matplotlib`"
        ) from e
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically and return the Path.

    The temp file lives in the destination directory so ``os.replace`` is a same-filesystem rename:
    readers see either the old picture or the complete new one, never a truncated file.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report picture should be world-readable
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out


def _wrap(text: str, width_in: float, fontsize: float = _TITLE_FS) -> str:
    """Wrap a title to the figure width; constrained layout does not wrap, it would clip instead."""
    chars = max(20, int(width_in * 72 / (fontsize * 0.55)))
    return "\n".join(textwrap.fill(line, chars) for line in text.splitlines() or [""])


def _clamp(x: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, x))


_NICE_STEPS = (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 200, 250, 256, 500, 512, 1000)


def _tick_step(n: int, max_labels: float) -> int:
    """Smallest "round" stride that shows at most ``max_labels`` of ``n`` tick labels."""
    raw = max(1, math.ceil(n / max(1.0, max_labels)))
    return next((s for s in _NICE_STEPS if s >= raw), raw)


def _max_labels(axis_len_in: float, label_chars: int, fontsize: float, along: bool) -> float:
    """How many tick labels fit along an axis of ``axis_len_in`` inches.

    ``along=True``: labels are laid out along their text direction (x-axis, horizontal text), so
    each needs its text width plus a gap; otherwise only the line height counts (y-axis).
    """
    per = fontsize * (0.62 * label_chars + 1.6) if along else fontsize * 1.5
    return axis_len_in * 72 / per


def _as_row(values: Sequence[Any]) -> np.ndarray:
    """JSON list -> float array; ``null`` (how JSON writes NaN) becomes NaN."""
    return np.asarray([np.nan if v is None else float(v) for v in values], dtype=float)


def _padded_matrix(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Stack rows of unequal length, padding with NaN (drawn blank: that expert does not exist)."""
    width = max((len(r) for r in rows), default=0)
    m = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        m[i, : len(r)] = r
    return m


def _require_layers(what: Mapping[str, Any], fn: str, arg: str) -> None:
    if not what:
        raise ValueError(f"{fn}: {arg} is empty (no layers to plot)")
    if all(len(v) == 0 for v in what.values()):
        raise ValueError(f"{fn}: {arg} has {len(what)} layer(s) but every one has no experts")


def _dropped_mask(
    kept: Mapping[str, Sequence[int]] | None, layers: Sequence[str], n_experts: Sequence[int], fn: str
) -> np.ndarray | None:
    """Boolean matrix, True where an existing expert is not in ``kept``; None when kept is None.

    A layer missing from ``kept`` is left unmarked (nothing is known about it, so nothing is
    claimed). Out-of-range indices are an error: they mean the record and the scores disagree.
    """
    if kept is None:
        return None
    width = max(n_experts, default=0)
    mask = np.zeros((len(layers), width), dtype=bool)
    for i, (layer, n) in enumerate(zip(layers, n_experts)):
        if layer not in kept:
            continue
        idx = [int(k) for k in kept[layer]]
        bad = [k for k in idx if not 0 <= k < n]
        if bad:
            raise ValueError(f"{fn}: kept[{layer!r}] has indices {bad[:5]} outside 0..{n - 1}")
        mask[i, :n] = True
        mask[i, idx] = False
    return mask


def _layer_ticks(ax: Axes, labels: Sequence[str], axis_len_in: float, axis: str) -> None:
    """Put (thinned) layer labels on ``axis`` ("x" or "y") of a per-layer plot."""
    n = len(labels)
    chars = max((len(s) for s in labels), default=1)
    if axis == "y":
        step = _tick_step(n, _max_labels(axis_len_in, chars, _TICK_FS, along=False))
        pos = list(range(0, n, step))
        ax.set_yticks(pos, [labels[i] for i in pos], fontsize=_TICK_FS)
        return
    # x axis: rotate long labels rather than thinning them away
    fits_flat = _max_labels(axis_len_in, chars, _TICK_FS, along=True)
    if fits_flat >= n or chars <= 4:
        step = _tick_step(n, fits_flat)
        pos = list(range(0, n, step))
        ax.set_xticks(pos, [labels[i] for i in pos], fontsize=_TICK_FS)
    else:
        step = _tick_step(n, _max_labels(axis_len_in, chars, _TICK_FS, along=False))
        pos = list(range(0, n, step))
        ax.set_xticks(pos, [labels[i] for i in pos], fontsize=_TICK_FS, rotation=45, ha="right",
                      rotation_mode="anchor")


def _expert_ticks(ax: Axes, n_experts: int, axis_len_in: float) -> None:
    """Thinned expert-index ticks on x (every 1/2/4/8/16/... experts)."""
    chars = len(str(max(0, n_experts - 1)))
    step = _tick_step(n_experts, _max_labels(axis_len_in, chars, _TICK_FS, along=True))
    pos = list(range(0, n_experts, step))
    ax.set_xticks(pos, [str(p) for p in pos], fontsize=_TICK_FS)


def _colorbar(fig: Figure, im: Any, ax: Axes, ax_w: float, ax_h: float, label: str, pad: float) -> None:
    """A slim (~0.22 in) labelled colorbar whatever the figure size.

    Default colorbars scale with the axes (fraction of width, height/aspect), which on a 20-inch
    heatmap gives a bar wider than several expert columns.
    """
    cb = fig.colorbar(im, ax=ax, fraction=_clamp(0.3 / ax_w, 0.015, 0.08), aspect=max(20.0, ax_h / 0.22),
                      pad=pad)
    cb.set_label(label, fontsize=_LABEL_FS)
    cb.ax.tick_params(labelsize=_TICK_FS)


def _heatmap_size(n_layers: int, n_experts: int, extra_w: float = 0.0) -> tuple[float, float, float, float]:
    """(fig width, fig height, approx. axes width, approx. axes height) in inches for a layer x expert grid.

    ~0.2 in per expert and ~0.24 in per layer, clamped to 5.5-20 x 3-14 in, so small models get
    visible cells and 64 x 256 still fits a screen (cells then shrink to ~0.07 in wide).
    """
    ax_w = _clamp(0.2 * n_experts, 4.0, 17.0)
    ax_h = _clamp(0.24 * n_layers, 1.8, 12.5)
    return ax_w + 2.6 + extra_w, ax_h + 1.5, ax_w, ax_h


# ----------------------------------------------------------------------------------------------
# 1. importance heatmap
# ----------------------------------------------------------------------------------------------


def importance_heatmap(
    scores: Mapping[str, Sequence[float]],
    kept: Mapping[str, Sequence[int]] | None,
    path: str | os.PathLike[str],
    *,
    title: str,
    score_label: str,
) -> Path:
    """Layers (rows) x experts (columns) heatmap of expert scores, dropped experts marked with x.

    Colour is each score divided by its layer's maximum: raw scores differ by orders of magnitude
    between layers (early layers see smaller activations), so one global scale would paint whole
    layers one colour and hide what the pruning decision actually compared - experts *within* a
    layer. If any score is negative, a per-layer min-max scaling is used instead (and the colorbar
    says so). Layers with fewer experts are padded with blank cells. ``kept`` maps a layer to the
    expert indices kept; experts not listed get an x; ``kept=None`` (scores only, nothing pruned
    yet) draws no markers.

    Raises:
        ValueError: ``scores`` is empty, or a ``kept`` index is out of range.
    """
    fn = "importance_heatmap"
    _require_layers(scores, fn, "scores")
    layers = list(scores)
    rows = [_as_row(scores[k]) for k in layers]
    raw = _padded_matrix(rows)
    finite = raw[np.isfinite(raw)]
    signed = bool(finite.size) and float(finite.min()) < 0
    norm = np.full_like(raw, np.nan)
    for i, r in enumerate(raw):
        ok = np.isfinite(r)
        if not ok.any():
            continue
        lo, hi = float(r[ok].min()), float(r[ok].max())
        if signed:
            norm[i, ok] = (r[ok] - lo) / (hi - lo) if hi > lo else 0.5
        else:
            norm[i, ok] = r[ok] / hi if hi > 0 else 0.0
    cbar_label = (
        f"({score_label} \u2212 layer min) / (layer max \u2212 layer min)"
        if signed
        else f"{score_label} / layer max"
    )
    # Heavy-tailed scores (a few hot experts per layer) leave the bulk - where the keep/drop cut
    # lies - in the darkest tenth of a linear scale. A square-root colour scale spreads it out.
    from matplotlib.colors import Normalize, PowerNorm

    nfin = norm[np.isfinite(norm)]
    heavy = bool(nfin.size) and float(np.median(nfin)) < 0.2
    cnorm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0) if heavy else Normalize(vmin=0.0, vmax=1.0)
    if heavy:
        cbar_label += " (square-root colour scale)"
    dropped = _dropped_mask(kept, layers, [len(r) for r in rows], fn)

    n_layers, n_experts = raw.shape
    fw, fh, ax_w, ax_h = _heatmap_size(n_layers, n_experts)
    fig = _new_figure(fw, fh)
    ax = fig.add_subplot()
    im = ax.imshow(norm, aspect="auto", interpolation="nearest", cmap="viridis", norm=cnorm)
    ax.set_facecolor("white")  # NaN padding -> blank
    _colorbar(fig, im, ax, ax_w, ax_h, cbar_label, pad=0.015)

    if dropped is not None and dropped.any():
        from matplotlib import patheffects
        from matplotlib.lines import Line2D

        ys, xs = np.nonzero(dropped)
        cell_pt = min(ax_w / n_experts, ax_h / n_layers) * 72
        size = _clamp(cell_pt * 0.55, 2.0, 9.0)
        lw = _clamp(size / 6, 0.5, 1.4)
        halo = [patheffects.withStroke(linewidth=lw + 1.2, foreground="black")]
        ax.scatter(xs, ys, marker="x", s=size**2, c="white", linewidths=lw, path_effects=halo, zorder=3)
        n_total = int(np.isfinite(raw).sum())
        proxy = Line2D([], [], ls="none", marker="x", color="white", markeredgewidth=1.4,
                       markersize=7, path_effects=[patheffects.withStroke(linewidth=2.6, foreground="black")])
        ax.legend([proxy], [f"dropped ({int(dropped.sum())} of {n_total} experts)"], loc="lower right",
                  bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=_LABEL_FS, borderaxespad=0.2)

    _expert_ticks(ax, n_experts, ax_w)
    _layer_ticks(ax, _layer_labels(layers), ax_h, "y")
    ax.set_xlabel("expert index", fontsize=_LABEL_FS)
    ax.set_ylabel("MoE layer", fontsize=_LABEL_FS)
    fig.suptitle(_wrap(title, fw), fontsize=_TITLE_FS)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# 2. score distributions
# ----------------------------------------------------------------------------------------------


def score_distributions(
    scores: Mapping[str, Sequence[float]],
    kept: Mapping[str, Sequence[int]] | None,
    path: str | os.PathLike[str],
    *,
    title: str,
    score_label: str,
) -> Path:
    """Per layer, a box plot of the expert scores with every expert as a jittered point.

    The heatmap normalises per layer; this view keeps raw values so the reader sees how the layers
    compare and how separated kept (blue) and dropped (red) experts are - a pruning decision made
    inside a tight cluster is fragile. The score axis turns logarithmic when every score is
    positive and they span more than two decades (otherwise the low layers collapse onto 0).
    Jitter uses a fixed seed so the picture is reproducible.

    Raises:
        ValueError: ``scores`` is empty, or a ``kept`` index is out of range.
    """
    fn = "score_distributions"
    _require_layers(scores, fn, "scores")
    layers = list(scores)
    rows = [_as_row(scores[k]) for k in layers]
    dropped = _dropped_mask(kept, layers, [len(r) for r in rows], fn)
    finite = np.concatenate([r[np.isfinite(r)] for r in rows])
    log = bool(finite.size) and float(finite.min()) > 0 and float(finite.max()) / float(finite.min()) > 100

    n_layers = len(layers)
    ax_w = _clamp(0.34 * n_layers, 4.5, 19.0)
    fw, fh = ax_w + 1.6, 4.8 if n_layers <= 24 else 5.6
    fig = _new_figure(fw, fh)
    ax = fig.add_subplot()
    data, pos = [], []
    for i, r in enumerate(rows):
        r = r[np.isfinite(r)]
        if r.size:
            data.append(r)
            pos.append(i)
    ax.boxplot(
        data, positions=pos, widths=0.65, showfliers=False, patch_artist=True, manage_ticks=False,
        boxprops={"facecolor": "#eeeeee", "edgecolor": "0.35", "linewidth": 0.8},
        medianprops={"color": "black", "linewidth": 1.1},
        whiskerprops={"color": "0.35", "linewidth": 0.8},
        capprops={"color": "0.35", "linewidth": 0.8},
        zorder=1,
    )
    max_experts = max(len(r) for r in rows)
    point_s = 14.0 if max_experts <= 32 else 6.0 if max_experts <= 128 else 3.0
    if n_layers > 32:
        point_s *= 0.6
    rng = np.random.default_rng(0)
    xs_k, ys_k, xs_d, ys_d = [], [], [], []
    for i, r in enumerate(rows):
        ok = np.isfinite(r)
        jitter = i + rng.uniform(-0.27, 0.27, size=len(r))
        drop = dropped[i, : len(r)] if dropped is not None else np.zeros(len(r), dtype=bool)
        xs_k.append(jitter[ok & ~drop])
        ys_k.append(r[ok & ~drop])
        xs_d.append(jitter[ok & drop])
        ys_d.append(r[ok & drop])
    xk, yk, xd, yd = (np.concatenate(v) for v in (xs_k, ys_k, xs_d, ys_d))
    ax.scatter(xk, yk, s=point_s, color=_KEPT_COLOR, alpha=0.7, linewidths=0, zorder=2,
               label="kept" if dropped is not None else "expert")
    if dropped is not None:
        ax.scatter(xd, yd, s=point_s * 1.3, color=_DROPPED_COLOR, alpha=0.85, linewidths=0, zorder=3,
                   label="dropped")
    if log:
        ax.set_yscale("log")
    ax.set_xlim(-0.6, n_layers - 0.4)
    _layer_ticks(ax, _layer_labels(layers), ax_w, "x")
    ax.tick_params(axis="y", labelsize=_TICK_FS)
    ax.set_xlabel("MoE layer", fontsize=_LABEL_FS)
    ax.set_ylabel(f"{score_label} (log scale)" if log else score_label, fontsize=_LABEL_FS)
    ax.grid(axis="y", color="0.9", linewidth=0.6, which="major")
    ax.set_axisbelow(True)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, frameon=False,
              fontsize=_LABEL_FS, markerscale=2.0 if point_s < 10 else 1.3, borderaxespad=0.2)
    fig.suptitle(_wrap(title, fw), fontsize=_TITLE_FS)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# 3. kept widths (channel pruning)
# ----------------------------------------------------------------------------------------------


def kept_widths(
    widths: Mapping[str, Sequence[int]],
    full_width: Mapping[str, int],
    path: str | os.PathLike[str],
    *,
    title: str,
) -> Path:
    """Layers x experts heatmap of kept intermediate width / full width (0..1), for channel pruning.

    Shown as a fraction rather than channel counts so layers of different width share one colour
    scale; the right-hand axis gives each layer's mean kept fraction (the layer's real compression).
    A width of 0 is a fully removed expert; blank cells are experts the layer does not have.

    Raises:
        ValueError: ``widths`` is empty, a layer has no ``full_width`` entry, or a full width <= 0.
    """
    fn = "kept_widths"
    _require_layers(widths, fn, "widths")
    layers = list(widths)
    missing = [k for k in layers if k not in full_width]
    if missing:
        raise ValueError(f"{fn}: full_width has no entry for {missing[:3]}")
    bad = [k for k in layers if not full_width[k] or full_width[k] <= 0]
    if bad:
        raise ValueError(f"{fn}: full_width must be > 0, got {[full_width[k] for k in bad[:3]]} for {bad[:3]}")
    rows = [_as_row(widths[k]) / float(full_width[k]) for k in layers]
    frac = _padded_matrix(rows)
    means = [float(np.nanmean(r)) if np.isfinite(r).any() else float("nan") for r in rows]

    n_layers, n_experts = frac.shape
    fw, fh, ax_w, ax_h = _heatmap_size(n_layers, n_experts, extra_w=0.9)
    fig = _new_figure(fw, fh)
    ax = fig.add_subplot()
    im = ax.imshow(frac, aspect="auto", interpolation="nearest", cmap="YlGnBu", vmin=0.0, vmax=1.0)
    ax.set_facecolor("white")
    _expert_ticks(ax, n_experts, ax_w)
    labels = _layer_labels(layers)
    _layer_ticks(ax, labels, ax_h, "y")
    ax.set_xlabel("expert index", fontsize=_LABEL_FS)
    ax.set_ylabel("MoE layer", fontsize=_LABEL_FS)

    # Right axis: mean kept fraction per layer, at the same (possibly thinned) rows as the left labels.
    right = ax.secondary_yaxis("right")
    shown = list(ax.get_yticks())
    right.set_yticks(shown, [f"{means[int(p)]:.0%}" if np.isfinite(means[int(p)]) else "" for p in shown],
                     fontsize=_TICK_FS)
    right.set_ylabel("layer mean kept fraction", fontsize=_LABEL_FS)

    _colorbar(fig, im, ax, ax_w, ax_h, "kept fraction of channels (kept width / full width)", pad=0.02)
    total = float(np.nansum([np.nansum(_as_row(widths[k])) for k in layers]))
    full = float(sum(full_width[k] * len(widths[k]) for k in layers))
    fig.suptitle(_wrap(f"{title}\n(overall {total / full:.1%} of expert channels kept)", fw),
                 fontsize=_TITLE_FS)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# 4. quality curves
# ----------------------------------------------------------------------------------------------


def quality_curves(
    points: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    metric: str,
    title: str,
    ylabel: str,
) -> Path:
    """One line per method: ``metric`` against the fraction pruned (``ratio``, shown in %).

    ``points`` are dicts like ``{"method": "reap", "ratio": 0.25, metric: 0.18}``; points without a
    numeric ``metric`` are skipped (a run may record several metrics but not every one each time).
    Repeated (method, ratio) points - several seeds - are averaged on the line and also drawn as
    faint dots so the spread stays visible. Methods are sorted by name so colours and legend order
    are stable across reports. A metric whose name contains "delta" gets a dashed zero line: above
    or below "no change" is the first thing to read off a delta.

    Raises:
        ValueError: ``points`` is empty or no point carries a numeric ``metric`` and ``ratio``.
    """
    fn = "quality_curves"
    if not points:
        raise ValueError(f"{fn}: points is empty (no results to plot)")
    by_method: dict[str, dict[float, list[float]]] = {}
    for p in points:
        v, r = p.get(metric), p.get("ratio")
        if v is None or r is None:
            continue
        try:
            v, r = float(v), float(r)
        except (TypeError, ValueError):
            continue
        if not (math.isfinite(v) and math.isfinite(r)):
            continue
        by_method.setdefault(str(p.get("method", "?")), {}).setdefault(r, []).append(v)
    if not by_method:
        raise ValueError(f"{fn}: none of the {len(points)} points has numeric 'ratio' and {metric!r}")

    methods = sorted(by_method)
    fw = 7.0 if len(methods) <= 6 else 8.6
    fig = _new_figure(fw, 4.4)
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(methods))]
    all_ratios: set[float] = set()
    for i, m in enumerate(methods):
        ratios = sorted(by_method[m])
        all_ratios.update(ratios)
        means = [float(np.mean(by_method[m][r])) for r in ratios]
        ax.plot(ratios, means, marker=_MARKERS[i % len(_MARKERS)], color=colors[i], label=m,
                linewidth=1.6, markersize=6)
        reps = [(r, v) for r in ratios if len(by_method[m][r]) > 1 for v in by_method[m][r]]
        if reps:
            ax.scatter(*zip(*reps), color=colors[i], alpha=0.35, s=14, linewidths=0, zorder=1)
    if "delta" in metric.lower():
        ax.axhline(0.0, color="0.35", linestyle="--", linewidth=0.9, zorder=0)

    from matplotlib.ticker import FuncFormatter

    if len(all_ratios) <= 12:
        ax.set_xticks(sorted(all_ratios))
    # "12.5%", "25%" - not "25.0%" (PercentFormatter pads every tick to the same decimals)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{round(v * 100, 2):g}%"))
    ax.tick_params(labelsize=_TICK_FS + 1)
    ax.set_xlabel("fraction pruned (%)", fontsize=_LABEL_FS)
    ax.set_ylabel(ylabel, fontsize=_LABEL_FS)
    ax.grid(color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)
    if len(methods) <= 6:
        ax.legend(title="method", fontsize=_LABEL_FS, title_fontsize=_LABEL_FS, loc="best")
    else:
        ax.legend(title="method", fontsize=_LABEL_FS, title_fontsize=_LABEL_FS, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.suptitle(_wrap(title, fw), fontsize=_TITLE_FS)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# 5. per-domain bars
# ----------------------------------------------------------------------------------------------


def domain_bars(
    results: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike[str],
    *,
    title: str,
    ylabel: str,
    xlabel: str = "domain",
) -> Path:
    """Grouped bars: one group per domain, one bar per model (e.g. "base", "reap 25%").

    Domains follow the first model's order (the base run defines the table), with domains only
    other models have appended. A missing value leaves a gap rather than a zero bar, so absence
    never reads as a score. Long or numerous domain names are rotated instead of overlapping.

    Raises:
        ValueError: ``results`` is empty or no model has any domain.
    """
    fn = "domain_bars"
    if not results:
        raise ValueError(f"{fn}: results is empty (no models to plot)")
    models = list(results)
    domains: list[str] = []
    for m in models:
        for d in results[m]:
            if d not in domains:
                domains.append(d)
    if not domains:
        raise ValueError(f"{fn}: results has {len(models)} model(s) but no domains")

    n_d, n_m = len(domains), len(models)
    ax_w = _clamp(n_d * (0.2 * n_m + 0.35), 4.5, 19.0)
    legend_outside = n_m > 4
    fw = ax_w + 1.4 + (1.8 if legend_outside else 0.0)
    labels = [_ellipsize(d, 24) for d in domains]
    chars = max(len(d) for d in labels)
    rotation = 0 if _max_labels(ax_w, chars, _TICK_FS + 1, along=True) >= n_d else 35 if n_d <= 24 else 90
    # Rotated labels hang below the axes; grow the figure so the plot area keeps its height.
    label_h = chars * (_TICK_FS + 1) * 0.6 / 72 * math.sin(math.radians(rotation))
    fig = _new_figure(fw, 4.2 + label_h)
    ax = fig.add_subplot()
    x = np.arange(n_d, dtype=float)
    width = 0.8 / n_m
    many_bars = n_d * n_m > 40
    bar_w_pt = ax_w * 72 / n_d * width
    for j, m in enumerate(models):
        vals = np.array([
            np.nan if results[m].get(d) is None else float(results[m][d]) for d in domains
        ])
        bars = ax.bar(x - 0.4 + width * (j + 0.5), vals, width=width * 0.95, label=m, color=f"C{j % 10}")
        if not many_bars:
            ax.bar_label(bars, labels=["" if not np.isfinite(v) else f"{v:.3g}" for v in vals],
                         fontsize=_TICK_FS - 1, padding=1.5, rotation=90 if bar_w_pt < 20 else 0)
    all_vals = [float(v) for r in results.values() for v in r.values() if v is not None]
    if all_vals and min(all_vals) < 0 < max(all_vals):
        ax.axhline(0.0, color="0.35", linewidth=0.8)
    if not many_bars:
        ax.margins(y=0.12)  # headroom for the value labels

    if rotation == 0:
        ax.set_xticks(x, labels, fontsize=_TICK_FS + 1)
    elif rotation == 90:
        ax.set_xticks(x, labels, fontsize=_TICK_FS + 1, rotation=90, ha="center")
    else:
        ax.set_xticks(x, labels, fontsize=_TICK_FS + 1, rotation=rotation, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.6, n_d - 0.4)
    ax.tick_params(axis="y", labelsize=_TICK_FS + 1)
    ax.set_xlabel(xlabel, fontsize=_LABEL_FS)
    ax.set_ylabel(ylabel, fontsize=_LABEL_FS)
    ax.grid(axis="y", color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)
    if legend_outside:
        ax.legend(title="model", fontsize=_LABEL_FS, title_fontsize=_LABEL_FS, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=_LABEL_FS, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=n_m,
                  frameon=False, borderaxespad=0.2)
    fig.suptitle(_wrap(title, fw), fontsize=_TITLE_FS)
    return _save(fig, path)
