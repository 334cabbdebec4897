"""Figures for reading a Whisper model from the inside (matplotlib, an optional extra).

Every function takes plain numpy arrays or lists (torch tensors are accepted and copied to the CPU),
checks them, draws one figure and writes it as a PNG. The figures never touch pyplot: they are built
on ``matplotlib.figure.Figure`` and rendered by the Agg canvas directly, so calling them changes no
global state (a user's interactive backend and open windows are left alone) and works without a display.

Sizes are fixed and documented per function so that the pixel size of a PNG is known in advance:
``round(width_in * dpi) x round(height_in * dpi)`` pixels. Where a size grows with the input, the inch
size is first rounded to whole pixels, so the formula holds exactly.

Writes are atomic: the PNG is rendered into a temporary file in the destination folder and renamed
over the destination only when complete, so a reader never sees half a picture and a failure leaves
any previous file untouched. The destination folder must exist.

Install the extra with ``pip install 'whisper-lens[plot]'``.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

LENS_DPI = 100  # lens_heatmap: 40 positions a panel; width max(6, 0.45*min(T, 40) + 2), see its docstring
LENS_WRAP = 40
LINES_SIZE = (7.0, 4.5)  # removal_curves and layer_lines: inches, at LINES_DPI
LINES_DPI = 120
GRID_CELL = (2.6, 2.4)  # attention_grid: inches per head; plus GRID_EXTRA for colourbar and title
GRID_EXTRA = (1.2, 0.8)
GRID_DPI = 100
POOL_TO = 200  # attention panels show at most this many cells a side: longer axes are max-pooled
OVER_MEL_WIDTH = 12.0  # cross_attention_over_mel: width; height 3 + max(2, 0.2*T) <= 30 in
OVER_MEL_DPI = 100
POSITION_SECONDS = 0.02  # one encoder position: two 10 ms mel frames
CROP_MARGIN = 0.5  # cross_attention_over_mel given the audio's length shows this many seconds after it

CELL_TEXT_CHARS = 6  # ... truncated to this many characters
TICK_LABEL_CHARS = 16  # axis labels made of tokens are truncated to this many characters
VISIBLE_WHITESPACE = str.maketrans({" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"})
INSTALL_HINT = "plotting needs matplotlib: pip install 'whisper-lens[plot]'"


# ----------------------------------------------------------------------------- the figures


def lens_heatmap(
    prob,
    top_tokens: Sequence[Sequence[str]],
    path: str | os.PathLike,
    *,
    layer_labels: Sequence[str] | None = None,
    position_labels: Sequence[str] | None = None,
    title: str = "Logit lens",
) -> Path:
    """The logit lens as a layers x positions picture: how early each position's final answer appears.

    ``prob`` is ``[L, T]``: the probability that reading layer ``l``'s residual stream through the final
    LayerNorm and unembedding gives, at position ``t``, the token the full model finally predicts there.
    ``top_tokens`` holds each readout's own top-1 token (``L`` lists of ``T`` strings), written in its cell.
    Read it bottom to top: a column that turns yellow low down is decided early; a cell whose text differs
    from the top row shows what that layer "thought" instead. Rows are layers (first at the bottom,
    ``layer_labels`` e.g. ``["emb", "1", ..., "final"]``), columns are input positions (``position_labels``).

    A long sequence (a 224-token transcript, a hallucinated loop) wraps like text: 40 positions per
    panel, panels one under the other, every cell still labelled. Cell text is truncated to 6
    characters and whitespace made visible (space as ␣, newline as ↵). Size: width
    ``max(6, 0.45*min(T, 40) + 2)`` in; height ``max(3, panels*(0.3*L + 1.3) + 0.5)`` capped at 160 in,
    with ``panels = ceil(T / 40)``; both rounded to whole pixels, at 100 dpi.
    """
    prob = _array(prob, "prob")
    if prob.ndim != 2 or prob.shape[0] == 0 or prob.shape[1] == 0:
        raise ValueError(f"prob must be a non-empty [layers, positions] array, got shape {prob.shape}")
    n_layers, n_pos = prob.shape
    if not np.all(np.isfinite(prob)) or prob.min() < -1e-6 or prob.max() > 1 + 1e-6:
        raise ValueError(f"prob must hold probabilities in [0, 1]; got values in [{prob.min()}, {prob.max()}]")
    if len(top_tokens) != n_layers or any(len(row) != n_pos for row in top_tokens):
        rows = [len(row) for row in top_tokens]
        raise ValueError(f"top_tokens has rows of lengths {rows} but prob has shape {prob.shape} (need L rows of T)")
    layer_labels = _labels(layer_labels, n_layers, "layer_labels", prob.shape, default=range(n_layers))
    position_labels = _labels(position_labels, n_pos, "position_labels", prob.shape, default=range(n_pos))
    path = _check_destination(path)
    Figure, _ = _matplotlib()

    panels = math.ceil(n_pos / LENS_WRAP)
    width = _whole_pixels(max(6.0, 0.45 * min(n_pos, LENS_WRAP) + 2.0), LENS_DPI)
    height = _whole_pixels(min(160.0, max(3.0, panels * (0.3 * n_layers + 1.3) + 0.5)), LENS_DPI)
    fig = Figure(figsize=(width, height), dpi=LENS_DPI, layout="constrained")
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    for i, ax in enumerate(axes):
        cols = slice(i * LENS_WRAP, min(n_pos, (i + 1) * LENS_WRAP))
        im = _lens_panel(ax, prob, top_tokens, cols, layer_labels, position_labels, full_width=panels > 1)
        if panels > 1:
            ax.set_title(f"positions {cols.start}-{cols.stop - 1}", fontsize=8, loc="left")
    fig.colorbar(im, ax=list(axes), label="p(final token)", fraction=0.05, pad=0.01, aspect=max(20, 10 * panels))
    axes[-1].set_xlabel("input position (token fed)")
    fig.suptitle(title, fontsize=10, parse_math=False)
    return _write(fig, path)


def _lens_panel(ax, prob: np.ndarray, top_tokens, cols: slice, layer_labels, position_labels, full_width: bool):
    """Positions ``cols`` of the lens heatmap on ``ax``: colours, each cell's top token, the axes' labels."""
    n_layers = prob.shape[0]
    part = prob[:, cols]  # (L, <= LENS_WRAP)
    extent = (cols.start - 0.5, cols.stop - 0.5, -0.5, n_layers - 0.5)
    im = ax.imshow(part, origin="lower", aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                   interpolation="nearest", extent=extent)  # fmt: skip
    cmap = im.get_cmap()
    for l in range(n_layers):
        for t in range(cols.start, cols.stop):
            r, g, b, _ = cmap(float(prob[l, t]))
            dark_cell = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(t, l, _short(top_tokens[l][t], CELL_TEXT_CHARS), ha="center", va="center", fontsize=6,
                    color="white" if dark_cell else "black", parse_math=False)  # fmt: skip
    ticks = list(range(cols.start, cols.stop))
    ax.set_xticks(ticks, [_short(position_labels[t], TICK_LABEL_CHARS) for t in ticks], rotation=90, fontsize=7)
    if full_width:  # the last panel of a wrapped picture keeps the others' cell width
        ax.set_xlim(cols.start - 0.5, cols.start + LENS_WRAP - 0.5)
    ax.set_yticks(range(n_layers), [str(s) for s in layer_labels], fontsize=7)
    for label in ax.get_xticklabels():
        label.set_parse_math(False)
    ax.set_ylabel("layer read")
    return im


def removal_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    *,
    metric: str = "WER",
    title: str = "Layer removal",
) -> Path:
    """How much the model needs its last blocks: an error metric against the number of final blocks removed.

    ``curves`` maps a stack name (e.g. ``"encoder"``, ``"decoder"``) to ``(k, value)`` pairs: the metric
    after skipping the last ``k`` blocks of that stack. A flat start means the last blocks add little; a
    steep rise marks where the stack's work is done. The y axis shows the raw value, from 0 up to 1.05 x
    the largest value but at least 1 and at most 3; values above 3 (hallucinating outputs can give a WER
    far above 1) are drawn at the top edge as open triangles labelled with their value. Size 7 x 4.5 in
    at 120 dpi.
    """
    if not curves:
        raise ValueError("curves is empty: give at least one stack name -> [(k, value), ...]")
    series = {}
    for name, pairs in curves.items():
        pts = _array(list(pairs), f"curves[{name!r}]") if len(pairs) else np.zeros((0, 2))
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
            raise ValueError(f"curves[{name!r}] must be a non-empty list of (k, value) pairs, got shape {pts.shape}")
        if not np.all(np.isfinite(pts)):
            raise ValueError(f"curves[{name!r}] holds a non-finite number: {pts.tolist()}")
        series[str(name)] = pts
    path = _check_destination(path)
    Figure, _ = _matplotlib()
    from matplotlib.ticker import MaxNLocator

    top_value = max(float(p[:, 1].max()) for p in series.values())
    y_max = max(1.0, min(3.0, 1.05 * top_value))
    fig = Figure(figsize=LINES_SIZE, dpi=LINES_DPI, layout="constrained")
    ax = fig.add_subplot()
    for name, pts in series.items():
        k, value = pts[:, 0], pts[:, 1]
        (line,) = ax.plot(k, np.minimum(value, y_max), marker="o", label=name)
        for x, v in zip(k, value, strict=True):
            if v > y_max:
                ax.plot([x], [y_max], marker="^", markersize=9, mfc="none", color=line.get_color(), clip_on=False)
                ax.annotate(
                    f"{v:.3g}", (x, y_max), xytext=(0, -14), textcoords="offset points", ha="center", fontsize=7
                )
    ax.set_ylim(min(0.0, min(float(p[:, 1].min()) for p in series.values())), y_max)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("blocks removed (last k)")
    ax.set_ylabel(metric)
    ax.set_title(title, parse_math=False)
    ax.grid(alpha=0.3)
    ax.legend()
    return _write(fig, path)


def attention_grid(
    patterns,
    path: str | os.PathLike,
    *,
    title: str = "Attention",
    head_labels: Sequence[str] | None = None,
    x_label: str = "key position",
    y_label: str = "query position",
    crop: int | None = None,
) -> Path:
    """One layer's attention heads side by side: where each query position looks.

    ``patterns`` is ``[H, T, S]``: head ``h``'s softmax weights of query ``t`` over key ``s`` (each row sums
    to 1). A bright diagonal is a head attending to its own position, a bright column a position every
    query reads (often the first token, an "attention sink"); for cross-attention (``S`` audio positions,
    up to 1500) a bright path from top-left to bottom-right is a head aligning text to audio. All heads
    share one colour scale, 0 to the largest weight, so heads can be compared by brightness. Axes longer
    than 200 positions are max-pooled in blocks, so a one-position peak stays visible.

    ``crop``: draw only the first ``crop`` key positions (and query positions, when the pattern is square:
    encoder self-attention), e.g. the audio of a short clip in a 1500-position window.

    Heads are laid out in ``ceil(sqrt(H))`` columns. Size: ``2.6 * columns + 1.2`` by ``2.4 * rows + 0.8``
    inches at 100 dpi.
    """
    patterns = _array(patterns, "patterns")
    if patterns.ndim != 3 or 0 in patterns.shape:
        raise ValueError(f"patterns must be a non-empty [heads, queries, keys] array, got shape {patterns.shape}")
    n_heads, n_query, n_key = patterns.shape
    if not np.all(np.isfinite(patterns)) or patterns.min() < 0:
        raise ValueError("patterns must hold attention weights (finite, >= 0); got a negative or non-finite value")
    if crop is not None:
        if not isinstance(crop, int) or crop < 1:
            raise ValueError(f"crop must be a positive number of positions, got {crop!r}")
        patterns = patterns[:, : crop if n_query == n_key else n_query, :crop]  # (H, T', S')
        n_query, n_key = patterns.shape[1:]
    head_labels = _labels(
        head_labels, n_heads, "head_labels", patterns.shape, default=[f"head {h}" for h in range(n_heads)]
    )
    path = _check_destination(path)
    Figure, _ = _matplotlib()

    cols = math.ceil(math.sqrt(n_heads))
    rows = math.ceil(n_heads / cols)
    size = (GRID_CELL[0] * cols + GRID_EXTRA[0], GRID_CELL[1] * rows + GRID_EXTRA[1])
    fig = Figure(figsize=size, dpi=GRID_DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    v_max = float(patterns.max()) or 1.0
    aspect = "equal" if n_query == n_key else "auto"
    for h, ax in enumerate(axes.flat):
        if h >= n_heads:
            ax.set_axis_off()
            continue
        im = ax.imshow(
            _max_pool(patterns[h], POOL_TO, POOL_TO),  # at most (POOL_TO, POOL_TO), sharp peaks kept
            cmap="viridis",
            vmin=0.0,
            vmax=v_max,
            aspect=aspect,
            interpolation="nearest",
            extent=(-0.5, n_key - 0.5, n_query - 0.5, -0.5),
        )
        ax.set_title(str(head_labels[h]), fontsize=9, parse_math=False)
        ax.tick_params(labelsize=7)
        if h % cols == 0:
            ax.set_ylabel(y_label, fontsize=8)
        if h + cols >= n_heads:  # nothing below it
            ax.set_xlabel(x_label, fontsize=8)
    fig.colorbar(im, ax=axes, label="attention weight", shrink=0.9)
    fig.suptitle(title, parse_math=False)
    return _write(fig, path)


def head_grid(
    values: Mapping[str, object],
    path: str | os.PathLike,
    *,
    title: str = "Attention heads",
    label: str = "value",
    centre: float | None = 0.0,
) -> Path:
    """One number per attention head, a panel per kind of attention: where in the model an effect lives.

    ``values`` maps a panel name (e.g. ``"self-attention"``, ``"cross-attention"``) to an ``[L, H]`` array
    (layer, head), e.g. how much the hallucination rate changes when that head is zeroed. Rows are layers
    (the first at the bottom), columns heads; every cell is written with its value (2 significant
    digits). With ``centre`` (default 0) the colours diverge from it, blue below and red above, on one
    symmetric scale for all panels, so a lone dark cell is a head that matters; ``centre=None`` uses
    one sequential scale from the smallest to the largest value.

    Size: panels side by side, each ``0.6*H + 1.0`` in wide, ``max(3, 0.45*L + 1.4)`` in high, plus 1.2 in
    for the colourbar, at 100 dpi.
    """
    if not values:
        raise ValueError("values is empty: give at least one panel name -> [layers, heads] array")
    panels = {str(name): _array(v, f"values[{name!r}]") for name, v in values.items()}
    shapes = {a.shape for a in panels.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or 0 in next(iter(shapes)):
        raise ValueError(f"every panel must be a non-empty [layers, heads] array of one shape, got {sorted(shapes)}")
    if not all(np.all(np.isfinite(a)) for a in panels.values()):
        raise ValueError("values must be finite")
    path = _check_destination(path)
    Figure, _ = _matplotlib()

    n_layers, n_heads = next(iter(shapes))
    everything = np.concatenate([a.ravel() for a in panels.values()])
    if centre is None:
        cmap, vmin, vmax = "viridis", float(everything.min()), float(everything.max())
    else:
        reach = float(np.abs(everything - centre).max()) or 1.0
        cmap, vmin, vmax = "RdBu_r", centre - reach, centre + reach
    width = _whole_pixels(len(panels) * (0.6 * n_heads + 1.0) + 1.2, GRID_DPI)
    height = _whole_pixels(max(3.0, 0.45 * n_layers + 1.4), GRID_DPI)
    fig = Figure(figsize=(width, height), dpi=GRID_DPI, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, a) in zip(axes, panels.items(), strict=True):
        im = ax.imshow(a, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        for l in range(n_layers):
            for h in range(n_heads):
                r, g, b, _ = im.cmap(im.norm(a[l, h]))
                dark_cell = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(h, l, f"{a[l, h]:.2g}", ha="center", va="center", fontsize=7,
                        color="white" if dark_cell else "black")  # fmt: skip
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        ax.tick_params(labelsize=8)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=10, parse_math=False)
    fig.colorbar(im, ax=list(axes), label=label, shrink=0.9)
    fig.suptitle(title, parse_math=False)
    return _write(fig, path)


def cross_attention_over_mel(
    mel,
    pattern,
    tokens: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str = "Cross-attention over the audio",
    seconds: float | None = None,
) -> Path:
    """Which stretch of sound each text token reads: cross-attention drawn under the spectrogram it attends to.

    ``mel`` is the ``[n_mels, frames]`` log-mel input (frames every 10 ms); ``pattern`` is ``[T, S]``, the
    cross-attention of ``T`` text tokens over the ``S = frames / 2`` encoder positions (20 ms each, since
    the encoder's second convolution has stride 2), e.g. averaged over one layer's heads; ``tokens`` names
    the ``T`` rows. Both panels share one time axis in seconds, so a bright spot in a token's row sits
    under the sound it reads; a well-aligned layer draws a staircase following the speech. The pattern is
    max-pooled to at most 1000 time cells (and 200 token rows), so one-position peaks stay visible.

    ``seconds``: the audio's length. Whisper pads every clip to its window (30 s for official models),
    so a 5 s clip fills a sixth of the picture: given its length, the picture shows the audio and
    0.5 s after it, and a bar per token at the right gives the attention mass on everything later
    (the padding; a model that attends there is not reading the audio).

    Size: 12 in wide, ``3 + max(2, 0.2*T)`` in high (capped at 30, rounded to whole pixels), at 100 dpi.
    """
    mel = _array(mel, "mel")
    pattern = _array(pattern, "pattern")
    if mel.ndim != 2 or 0 in mel.shape:
        raise ValueError(f"mel must be a non-empty [n_mels, frames] array, got shape {mel.shape}")
    if pattern.ndim != 2 or 0 in pattern.shape:
        raise ValueError(f"pattern must be a non-empty [tokens, audio positions] array, got shape {pattern.shape}")
    n_tokens, n_audio = pattern.shape
    if mel.shape[1] != 2 * n_audio:
        raise ValueError(
            f"mel has shape {mel.shape} but pattern has shape {pattern.shape}: "
            f"need frames == 2 * audio positions ({2 * n_audio})"
        )
    if len(tokens) != n_tokens:
        raise ValueError(f"tokens has {len(tokens)} entries but pattern has shape {pattern.shape} (need one per row)")
    if not (np.all(np.isfinite(mel)) and np.all(np.isfinite(pattern))):
        raise ValueError("mel and pattern must be finite")
    if seconds is not None and not (isinstance(seconds, int | float) and seconds > 0):
        raise ValueError(f"seconds (the audio's length) must be a positive number, got {seconds!r}")
    path = _check_destination(path)
    Figure, _ = _matplotlib()

    shown = n_audio if seconds is None else min(n_audio, math.ceil((seconds + CROP_MARGIN) / POSITION_SECONDS))
    pattern_height = max(2.0, 0.2 * n_tokens)
    height = _whole_pixels(min(30.0, 3.0 + pattern_height), OVER_MEL_DPI)
    fig = Figure(figsize=(OVER_MEL_WIDTH, height), dpi=OVER_MEL_DPI, layout="constrained")
    (ax_mel, ax_blank, cax_mel), (ax_att, ax_rest, cax_att) = fig.subplots(
        2, 3, width_ratios=[12.0, 1.2 if shown < n_audio else 0.01, 0.25], height_ratios=[2.0, pattern_height]
    )
    ax_blank.set_axis_off()
    end = shown * POSITION_SECONDS
    im = ax_mel.imshow(mel[:, : 2 * shown], origin="lower", aspect="auto", cmap="magma",
                       extent=(0, end, 0, mel.shape[0]))  # fmt: skip
    fig.colorbar(im, cax=cax_mel, label="log-mel")
    ax_mel.set_ylabel("mel bin")
    ax_mel.set_xticklabels([])
    im = ax_att.imshow(
        _max_pool(pattern[:, :shown], 200, 1000),  # at most (200, 1000) cells, each the maximum of its block
        aspect="auto",
        cmap="viridis",
        vmin=0.0,
        extent=(0, end, n_tokens - 0.5, -0.5),
        interpolation="nearest",
    )
    ax_mel.set_xlim(0, end)
    fig.colorbar(im, cax=cax_att, label="attention weight")
    _token_ticks(ax_att, tokens, n_tokens, pattern_height)
    ax_att.set_ylabel("text token")
    ax_att.set_xlabel("time (s)")
    if shown < n_audio:
        ax_rest.barh(np.arange(n_tokens), pattern[:, shown:].sum(axis=1), height=1.0, color="tab:red")
        ax_rest.set_xlim(0, 1)
        ax_rest.set_ylim(n_tokens - 0.5, -0.5)
        ax_rest.set_yticks([])
        ax_rest.tick_params(labelsize=7)
        ax_rest.set_xlabel(f"mass after\n{end:.1f} s", fontsize=8)
    else:
        ax_rest.set_axis_off()
    ax_mel.set_title(title, parse_math=False)
    return _write(fig, path)


def layer_lines(
    values: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    labels: Sequence[str],
    ylabel: str,
    title: str,
    xlabel: str = "layer",
    log: bool = False,
) -> Path:
    """A per-layer quantity as lines, one per series: how a measurement evolves with depth.

    ``values`` maps a series name to one number per layer (e.g. the logit lens's top-1 agreement with the
    final output, or its KL divergence to the final distribution), in the order of ``labels`` (the x tick
    labels, e.g. ``["emb", "1", ..., "final"]``). Where a rising agreement curve flattens, later layers
    stop changing the answer. ``log``: a logarithmic y axis, for probabilities that grow by orders of
    magnitude before they matter (values must then be > 0). Size 7 x 4.5 in at 120 dpi.
    """
    if not values:
        raise ValueError("values is empty: give at least one series name -> [one number per layer]")
    series = {}
    for name, ys in values.items():
        ys = _array(ys, f"values[{name!r}]")
        if ys.shape != (len(labels),):
            raise ValueError(f"values[{name!r}] has shape {ys.shape} but labels has {len(labels)} entries")
        series[str(name)] = ys
    if len(labels) == 0:
        raise ValueError("labels is empty: give one label per layer")
    if log and any(np.any(ys <= 0) for ys in series.values()):
        raise ValueError("log=True needs values > 0 (a logarithmic axis has no zero)")
    path = _check_destination(path)
    Figure, _ = _matplotlib()

    fig = Figure(figsize=LINES_SIZE, dpi=LINES_DPI, layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", markersize=4, label=name)
    ax.set_xticks(x, [str(s) for s in labels], rotation=90 if len(labels) > 14 else 0, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, parse_math=False)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(series) > 6 else None)
    return _write(fig, path)


# ----------------------------------------------------------------------------- helpers


def _matplotlib():
    """Import matplotlib's Figure and Agg canvas (no pyplot, so no backend is selected or changed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return Figure, FigureCanvasAgg


def _array(x, name: str) -> np.ndarray:
    """A float numpy array from a list, numpy array or torch tensor (any device or dtype)."""
    if hasattr(x, "detach"):  # a torch tensor; bfloat16 has no numpy dtype, so go through float32
        x = x.detach().float().cpu()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric and rectangular: {e}") from None


def _labels(labels, n: int, name: str, shape: tuple, default) -> list:
    """``labels`` as a list of length ``n`` (``default`` when None); ValueError naming both sizes otherwise."""
    labels = list(default if labels is None else labels)
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} entries but the data has shape {shape} (need {n})")
    return labels


def _token_ticks(ax, tokens, rows: int, height: float) -> None:
    """Label the rows of a token-by-time picture ``height`` inches tall: about 0.12 in per label, text as is."""
    step = max(1, math.ceil(rows * 0.12 / height))
    ticks = list(range(0, rows, step))
    ax.set_yticks(ticks, [_short(tokens[t], TICK_LABEL_CHARS) for t in ticks], fontsize=7)
    for label in ax.get_yticklabels():
        label.set_parse_math(False)


def _short(text, limit: int) -> str:
    """``text`` with whitespace made visible, cut to ``limit`` characters (an ellipsis marks the cut)."""
    text = str(text).translate(VISIBLE_WHITESPACE)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _max_pool(a: np.ndarray, max_rows: int, max_cols: int) -> np.ndarray:
    """Shrink a 2-D ``a`` to at most ``max_rows x max_cols`` by taking the maximum of each block.

    A figure panel has a few hundred pixels, fewer than the 1500 positions of Whisper's audio. Plain
    resampling averages a sharp one-position peak away (or skips it); the block maximum keeps it visible.
    """
    fr, fc = math.ceil(a.shape[0] / max_rows), math.ceil(a.shape[1] / max_cols)
    if fr == 1 and fc == 1:
        return a
    rows, cols = math.ceil(a.shape[0] / fr), math.ceil(a.shape[1] / fc)
    padded = np.full((rows * fr, cols * fc), -np.inf)
    padded[: a.shape[0], : a.shape[1]] = a
    return padded.reshape(rows, fr, cols, fc).max(axis=(1, 3))  # (rows, cols)


def _whole_pixels(inches: float, dpi: int) -> float:
    """``inches`` rounded to a whole number of pixels, so the PNG is exactly ``round(inches * dpi)`` wide."""
    return round(inches * dpi) / dpi


def _check_destination(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figures are written as PNG: give a path ending in .png, not {path}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist; create it first")
    return path


def _write(fig, path: Path) -> Path:
    """Render ``fig`` to a temporary PNG beside ``path``, then rename it into place (atomic on one filesystem)."""
    _, FigureCanvasAgg = _matplotlib()
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:  # honours the umask, unlike mkstemp's 0600
            FigureCanvasAgg(fig).print_png(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- word timing (transcribe.py)

WORDS_WIDTH = 12.0  # word_alignment: width; height 3 + max(2, 0.2 * rows) <= 30 in, at WORDS_DPI
WORDS_DPI = 100


def word_alignment(
    mel,
    matrix,
    dtw_path,
    tokens: Sequence[str],
    words: Sequence[tuple[str, float, float]],
    path: str | os.PathLike,
    *,
    title: str = "Word timing: the alignment heads' attention and its DTW path",
) -> Path:
    """How words were timed: the alignment heads' attention under the spectrogram, the DTW path and the words.

    ``mel`` [n_mels, frames]: the window's log-mel (frames every 10 ms; only the first ``2 * P``
    are drawn); ``matrix`` [rows, P]: the heads' standardised, filtered, averaged attention over
    the P positions (20 ms each) that hold audio, row k the step predicting text token k and the
    last row EOT (``alignment.Alignment.matrix``); ``dtw_path`` [2, steps]: (row, position)
    pairs (``Alignment.path``); ``tokens`` names the rows; ``words``: (text, start s, end s) drawn
    as spans over the spectrogram and boundaries across both panels. Get all of them for a
    window of a transcript with ``transcribe.window_alignment``.

    Size: 12 in wide, ``3 + max(2, 0.2 * rows)`` in high (capped at 30, rounded to whole pixels), at 100 dpi.
    """
    mel, matrix, dtw_path = _array(mel, "mel"), _array(matrix, "matrix"), _array(dtw_path, "dtw_path")
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"matrix must be a non-empty [rows, positions] array, got shape {matrix.shape}")
    rows, positions = matrix.shape
    if mel.ndim != 2 or mel.shape[1] < 2 * positions:
        raise ValueError(f"mel must be [n_mels, frames] with at least {2 * positions} frames, got shape {mel.shape}")
    if dtw_path.ndim != 2 or dtw_path.shape[0] != 2:
        raise ValueError(f"dtw_path must be [2, steps] (rows, positions), got shape {dtw_path.shape}")
    tokens = _labels(tokens, rows, "tokens", matrix.shape, None)
    if not (np.all(np.isfinite(mel)) and np.all(np.isfinite(matrix))):
        raise ValueError("mel and matrix must be finite")
    path = _check_destination(path)
    Figure, _ = _matplotlib()

    seconds = positions * 0.02
    matrix_height = max(2.0, 0.2 * rows)
    fig = Figure(figsize=(WORDS_WIDTH, _whole_pixels(min(30.0, 3.0 + matrix_height), WORDS_DPI)), dpi=WORDS_DPI,
                 layout="constrained")  # fmt: skip
    ax_mel, ax_att = fig.subplots(2, 1, sharex=True, height_ratios=[2.0, matrix_height])
    ax_mel.imshow(mel[:, : 2 * positions], origin="lower", aspect="auto", cmap="magma",
                  extent=(0, seconds, 0, mel.shape[0]))  # fmt: skip
    ax_mel.set_ylabel("mel bin")
    im = ax_att.imshow(_max_pool(matrix, 200, 1000), aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=(0, seconds, rows - 0.5, -0.5))  # fmt: skip
    fig.colorbar(im, ax=ax_att, label="standardised attention", pad=0.01)
    ax_att.plot((dtw_path[1] + 0.5) * 0.02, dtw_path[0], color="white", linewidth=1.2, label="DTW path")
    for i, (word, start, end) in enumerate(words):
        for ax in (ax_mel, ax_att):
            ax.axvline(start, color="white", linewidth=0.6, linestyle="--", alpha=0.7)
        y = mel.shape[0] * (0.92 if i % 2 else 0.8)  # alternate heights, so neighbours do not overlap
        ax_mel.text((start + end) / 2, y, _short(word.strip(), TICK_LABEL_CHARS), color="white", ha="center",
                    fontsize=7, parse_math=False)  # fmt: skip
    _token_ticks(ax_att, tokens, rows, matrix_height)
    ax_att.set_ylabel("text token (row predicting it)")
    ax_att.set_xlabel("time in the window (s)")
    ax_att.legend(loc="upper right", fontsize=7)
    ax_mel.set_title(title, parse_math=False)
    return _write(fig, path)
