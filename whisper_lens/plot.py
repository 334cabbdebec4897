"""Figures for reading a Whisper model from the inside (matplotlib, an optional extra).

Every function takes plain numpy arrays or lists (torch tensors are accepted and copied to the CPU),
checks them and returns a ``matplotlib.figure.Figure``: shown inline in a notebook, combined with
others, or written with ``save(fig, "name.png")`` (or ``.svg``, ``.pdf``: any format matplotlib writes).
Single-panel pictures take ``ax=`` to draw into an existing Axes; the others take ``fig=`` (a Figure
or a SubFigure) to draw into. The figures never touch pyplot: they are built on
``matplotlib.figure.Figure``, so calling them changes no global state and works without a display.

Readable by default:

- sizes follow the content (more tokens, layers or heads: a larger figure), so text never shrinks;
- labels are never cut by the figure's edge (the layout makes room); a long token is shortened to
  its start and an ellipsis, a long title is wrapped;
- tokens are given as text (``pages.explorer.token_texts`` merges characters cut across tokens)
  with whitespace made visible (space as ␣, newline as ↵);
- audio axes are in seconds, text axes carry the tokens;
- pictures meant to be compared take one ``vmax`` (the colourbar says the scale is shared);
- a long transcript is cropped to its first ``max_tokens`` rows, and the title says so.

Install the extra with ``pip install 'whisper-lens[plot]'``.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

DPI = 100  # figure dpi (layout); save() writes PNGs at SAVE_DPI
SAVE_DPI = 150
FONT = 9  # tick labels and cell text, points
CHAR_IN = 0.0085 * FONT  # about one character's width at FONT, inches
LENS_WRAP = 40  # lens_heatmap: positions per panel
POOL_TO = 200  # attention panels show at most this many cells a side: longer axes are max-pooled
POSITION_SECONDS = 0.02  # one encoder position: two 10 ms mel frames
CROP_MARGIN = 0.5  # cross_attention_over_mel given the audio's length shows this many seconds after it
MAX_TOKENS = 48  # token rows drawn against the audio; more are cropped (stated in the title)
CELL_TEXT_CHARS = 6  # lens cells: the top token, shortened to this many characters
TICK_LABEL_CHARS = 14  # axis labels made of tokens are shortened to this many characters
VISIBLE_WHITESPACE = str.maketrans({" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"})
INSTALL_HINT = "plotting needs matplotlib: pip install 'whisper-lens[plot]'"


# ----------------------------------------------------------------------------- the figures


def lens_heatmap(
    prob,
    top_tokens: Sequence[Sequence[str]],
    *,
    layer_labels: Sequence[str] | None = None,
    position_labels: Sequence[str] | None = None,
    title: str = "Logit lens",
    scale_label: str = "p(final token)",
    fig=None,
):
    """The logit lens as a layers x positions picture: how early each position's final answer appears.

    ``prob`` is ``[L, T]``: the probability that reading layer ``l``'s residual stream through the final
    LayerNorm and unembedding gives, at position ``t``, the token the full model finally predicts there.
    ``top_tokens`` holds each readout's own top-1 token (``L`` lists of ``T`` strings), written in its cell.
    Read it bottom to top: a column that turns yellow low down is decided early; a cell whose text differs
    from the top row shows what that layer "thought" instead. Rows are layers (first at the bottom,
    ``layer_labels`` e.g. ``["emb", "1", ..., "final"]``), columns are input positions (``position_labels``).
    The colour scale is absolute, 0 to 1, so two lens pictures compare directly.

    A long sequence (a 224-token transcript) wraps like text: 40 positions per panel, panels one under
    the other, every cell still labelled. Size: 0.62 in per position (at most 40 a row), 0.32 in per
    layer per panel plus room for the position labels.
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
    layer_labels = [str(s) for s in _labels(layer_labels, n_layers, "layer_labels", prob.shape, range(n_layers))]
    position_labels = _labels(position_labels, n_pos, "position_labels", prob.shape, default=range(n_pos))
    position_labels = [_short(s, TICK_LABEL_CHARS) for s in position_labels]

    panels = math.ceil(n_pos / LENS_WRAP)
    per_row = min(n_pos, LENS_WRAP)
    label_in = CHAR_IN * max(len(s) for s in position_labels) + 0.2  # rotated position labels
    y_label_in = CHAR_IN * max(len(s) for s in layer_labels) + 0.5
    width = max(6.0, 0.62 * per_row + y_label_in + 1.3)
    height = panels * (0.32 * n_layers + label_in + 0.45) + 0.6 + _title_lines(title, width) * 0.2
    fig = _figure(fig, width, height)
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    for i, ax in enumerate(axes):
        cols = slice(i * LENS_WRAP, min(n_pos, (i + 1) * LENS_WRAP))
        im = _lens_panel(ax, prob, top_tokens, cols, layer_labels, position_labels, full_width=panels > 1)
        if panels > 1:
            ax.set_title(f"positions {cols.start}-{cols.stop - 1}", fontsize=FONT, loc="left")
    fig.colorbar(im, ax=list(axes), label=f"{scale_label} (0 to 1)", fraction=0.05, pad=0.01,
                 aspect=max(20, 10 * panels))  # fmt: skip
    axes[-1].set_xlabel("input position (token fed)")
    _suptitle(fig, title, width)
    return _root(fig)


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
            ax.text(t, l, _short(top_tokens[l][t], CELL_TEXT_CHARS), ha="center", va="center", fontsize=FONT - 2,
                    color="white" if dark_cell else "black", parse_math=False)  # fmt: skip
    ticks = list(range(cols.start, cols.stop))
    ax.set_xticks(ticks, [position_labels[t] for t in ticks], rotation=90, fontsize=FONT)
    if full_width:  # the last panel of a wrapped picture keeps the others' cell width
        ax.set_xlim(cols.start - 0.5, cols.start + LENS_WRAP - 0.5)
    ax.set_yticks(range(n_layers), layer_labels, fontsize=FONT)
    _plain(ax)
    ax.set_ylabel("layer read")
    return im


def removal_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    *,
    metric: str = "WER",
    title: str = "Layer removal",
    ax=None,
):
    """How much the model needs its last blocks: an error metric against the number of final blocks removed.

    ``curves`` maps a stack name (e.g. ``"encoder"``, ``"decoder"``) to ``(k, value)`` pairs: the metric
    after skipping the last ``k`` blocks of that stack. A flat start means the last blocks add little; a
    steep rise marks where the stack's work is done. The y axis shows the raw value, from 0 up to 1.05 x
    the largest value but at least 1 and at most 3; values above 3 (hallucinating outputs can give a WER
    far above 1) are drawn at the top edge as open triangles, their value written beside them. 7 x 4.5 in.
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
    from matplotlib.ticker import MaxNLocator

    ax = _axes(ax, 7.0, 4.5)
    top_value = max(float(p[:, 1].max()) for p in series.values())
    y_max = max(1.0, min(3.0, 1.05 * top_value))
    above = 0
    for name, pts in series.items():
        k, value = pts[:, 0], pts[:, 1]
        (line,) = ax.plot(k, np.minimum(value, y_max), marker="o", label=name)
        for x, v in zip(k, value, strict=True):
            if v > y_max:
                ax.plot([x], [y_max], marker="^", markersize=9, mfc="none", color=line.get_color(), clip_on=False)
                ax.annotate(f"{v:.3g}", (x, y_max), xytext=(7, -12 - 10 * (above % 2)), textcoords="offset points",
                            ha="left", fontsize=FONT - 1, color=line.get_color())  # fmt: skip
                above += 1
    ax.set_ylim(min(0.0, min(float(p[:, 1].min()) for p in series.values())), y_max)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("blocks removed (last k)")
    ax.set_ylabel(metric)
    ax.set_title(title, parse_math=False)
    ax.grid(alpha=0.3)
    ax.legend()
    return _root(ax.figure)


def attention_grid(
    patterns,
    *,
    title: str = "Attention",
    head_labels: Sequence[str] | None = None,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    key_seconds: float | None = None,
    crop: int | None = None,
    vmax: float | None = None,
    max_tokens: int = MAX_TOKENS,
    fig=None,
):
    """One layer's attention heads side by side: where each query position looks.

    ``patterns`` is ``[H, T, S]``: head ``h``'s softmax weights of query ``t`` over key ``s`` (each row sums
    to 1). A bright diagonal is a head attending to its own position, a bright column a position every
    query reads (often the first token, an "attention sink"); for cross-attention a bright path from
    top-left to bottom-right is a head aligning text to audio. Axes longer than 200 positions are
    max-pooled in blocks, so a one-position peak stays visible.

    Axes: ``query_labels`` / ``key_labels`` put token text on the rows / columns (decoder attention);
    ``key_seconds`` (0.02 for Whisper's audio positions) draws the keys in seconds, and the queries too
    when the pattern is square (encoder self-attention). ``crop``: draw only the first ``crop`` keys
    (and queries, when square), e.g. a short clip's audio in a 30 s window. More than ``max_tokens``
    token rows are cropped to the first ones (the title says so).

    Colour: one scale for all heads, 0 to ``vmax`` (default: the largest weight shown); pass the same
    ``vmax`` to pictures that are compared, and the colourbar says it is shared.
    Heads are laid out in ``ceil(sqrt(H))`` columns of about 2.8 in.
    """
    patterns = _array(patterns, "patterns")
    if patterns.ndim != 3 or 0 in patterns.shape:
        raise ValueError(f"patterns must be a non-empty [heads, queries, keys] array, got shape {patterns.shape}")
    n_heads, n_query, n_key = patterns.shape
    if not np.all(np.isfinite(patterns)) or patterns.min() < 0:
        raise ValueError("patterns must hold attention weights (finite, >= 0); got a negative or non-finite value")
    square = n_query == n_key
    query_labels = None if query_labels is None else _labels(query_labels, n_query, "query_labels", patterns.shape, 0)
    key_labels = None if key_labels is None else _labels(key_labels, n_key, "key_labels", patterns.shape, 0)
    if crop is not None:
        if not isinstance(crop, int) or isinstance(crop, bool) or crop < 1:
            raise ValueError(f"crop must be a positive number of positions, got {crop!r}")
        patterns = patterns[:, : crop if square else n_query, :crop]  # (H, T', S')
        key_labels = None if key_labels is None else key_labels[:crop]
        query_labels = None if query_labels is None or not square else query_labels[:crop]
    notes = []
    if query_labels is not None and patterns.shape[1] > max_tokens:
        notes.append(f"first {max_tokens} of {patterns.shape[1]} tokens")
        patterns, query_labels = patterns[:, :max_tokens], query_labels[:max_tokens]
        if key_labels is not None and square:
            patterns, key_labels = patterns[:, :, :max_tokens], key_labels[:max_tokens]
    n_query, n_key = patterns.shape[1:]
    head_labels = _labels(head_labels, n_heads, "head_labels", patterns.shape, [f"head {h}" for h in range(n_heads)])
    vmax = _check_vmax(vmax, patterns)

    cols = math.ceil(math.sqrt(n_heads))
    rows = math.ceil(n_heads / cols)
    y_room = CHAR_IN * (max(len(_short(s, TICK_LABEL_CHARS)) for s in query_labels) if query_labels else 5) + 0.5
    x_room = CHAR_IN * (max(len(_short(s, TICK_LABEL_CHARS)) for s in key_labels) if key_labels else 2) + 0.5
    cell = max(2.4, 0.14 * min(n_query, 60)) if query_labels else 2.4  # tall enough for every row's label
    width = cols * (2.8 + y_room) + 1.3
    height = rows * (cell + x_room + 0.35) + 0.5 + _title_lines(title, width) * 0.2
    fig = _figure(fig, width, height)
    axes = fig.subplots(rows, cols, squeeze=False)
    x_extent = (0.0, n_key * key_seconds) if key_seconds else (-0.5, n_key - 0.5)
    y_seconds = bool(key_seconds) and square and query_labels is None  # encoder self-attention: both in seconds
    y_extent = (n_query * key_seconds, 0.0) if y_seconds else (n_query - 0.5, -0.5)
    for h, ax in enumerate(axes.flat):
        if h >= n_heads:
            ax.set_axis_off()
            continue
        im = ax.imshow(
            _max_pool(patterns[h], POOL_TO, POOL_TO),  # at most (POOL_TO, POOL_TO), sharp peaks kept
            cmap="viridis",
            vmin=0.0,
            vmax=vmax[0],
            aspect="equal" if square and query_labels is None else "auto",
            interpolation="nearest",
            extent=(*x_extent, *y_extent),
        )
        ax.set_title(str(head_labels[h]), fontsize=FONT + 1, parse_math=False)
        ax.tick_params(labelsize=FONT - 1)
        if query_labels is not None:
            _token_ticks(ax, query_labels, "y", cell)
        if key_labels is not None:
            _token_ticks(ax, key_labels, "x", 2.8)
        if h % cols == 0:
            ax.set_ylabel("query token" if query_labels else ("time (s)" if y_seconds else "query position"),
                          fontsize=FONT)  # fmt: skip
        if h + cols >= n_heads:  # nothing below it
            ax.set_xlabel("time (s)" if key_seconds else ("key token" if key_labels else "key position"), fontsize=FONT)
        _plain(ax)
    fig.colorbar(im, ax=axes, label="attention weight", shrink=0.9)
    _suptitle(fig, f"{title} ({', '.join([*notes, vmax[1]])})", width)
    return _root(fig)


def head_grid(
    values: Mapping[str, object],
    *,
    title: str = "Attention heads",
    label: str = "value",
    centre: float | None = 0.0,
    fig=None,
):
    """One number per attention head, a panel per kind of attention: where in the model an effect lives.

    ``values`` maps a panel name (e.g. ``"self-attention"``, ``"cross-attention"``) to an ``[L, H]`` array
    (layer, head), e.g. how much the hallucination rate changes when that head is zeroed. Rows are layers
    (the first at the bottom), columns heads; every cell is written with its value (2 significant
    digits). With ``centre`` (default 0) the colours diverge from it, blue below and red above, on one
    symmetric scale for all panels, so a lone dark cell is a head that matters; ``centre=None`` uses
    one sequential scale from the smallest to the largest value. Panels of ``0.62*H + 1.0`` in.
    """
    if not values:
        raise ValueError("values is empty: give at least one panel name -> [layers, heads] array")
    panels = {str(name): _array(v, f"values[{name!r}]") for name, v in values.items()}
    shapes = {a.shape for a in panels.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or 0 in next(iter(shapes)):
        raise ValueError(f"every panel must be a non-empty [layers, heads] array of one shape, got {sorted(shapes)}")
    if not all(np.all(np.isfinite(a)) for a in panels.values()):
        raise ValueError("values must be finite")

    n_layers, n_heads = next(iter(shapes))
    everything = np.concatenate([a.ravel() for a in panels.values()])
    if centre is None:
        cmap, vmin, vmax = "viridis", float(everything.min()), float(everything.max())
    else:
        reach = float(np.abs(everything - centre).max()) or 1.0
        cmap, vmin, vmax = "RdBu_r", centre - reach, centre + reach
    width = len(panels) * (0.62 * n_heads + 1.0) + 1.4
    height = max(3.0, 0.45 * n_layers + 1.6) + _title_lines(title, width) * 0.2
    fig = _figure(fig, width, height)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, a) in zip(axes, panels.items(), strict=True):
        im = ax.imshow(a, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        for l in range(n_layers):
            for h in range(n_heads):
                r, g, b, _ = im.cmap(im.norm(a[l, h]))
                dark_cell = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(h, l, _significant(a[l, h]), ha="center", va="center", fontsize=FONT - 2,
                        color="white" if dark_cell else "black")  # fmt: skip
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        ax.tick_params(labelsize=FONT)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=FONT + 1, parse_math=False)
    fig.colorbar(im, ax=list(axes), label=label, shrink=0.9)
    _suptitle(fig, title, width)
    return _root(fig)


def cross_attention_over_mel(
    mel,
    pattern,
    tokens: Sequence[str],
    *,
    title: str = "Cross-attention over the audio",
    seconds: float | None = None,
    vmax: float | None = None,
    max_tokens: int = MAX_TOKENS,
    fig=None,
):
    """Which stretch of sound each text token reads: cross-attention drawn under the spectrogram it attends to.

    ``mel`` is the ``[n_mels, frames]`` log-mel input (frames every 10 ms); ``pattern`` is ``[T, S]``, the
    cross-attention of ``T`` text tokens over the ``S = frames / 2`` encoder positions (20 ms each, since
    the encoder's second convolution has stride 2), e.g. averaged over one layer's heads; ``tokens`` names
    the ``T`` rows. Both panels share one time axis in seconds, so a bright spot in a token's row sits
    under the sound it reads; a well-aligned layer draws a staircase following the speech. The pattern is
    max-pooled to at most 1000 time cells, so one-position peaks stay visible.

    ``seconds``: the audio's length. Whisper pads every clip to its window (30 s for official models):
    given its length, the picture shows the audio and 0.5 s after it, and a bar per token at the right
    gives the attention mass on everything later (the padding; a model that attends there is not reading
    the audio). More than ``max_tokens`` rows (a hallucinated loop) are cropped to the first ones, stated
    in the title. ``vmax``: one colour scale for pictures that are compared (default: this one's maximum).
    12 in wide; 2 in for the spectrogram and 0.17 in per token row.
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
    notes = []
    if n_tokens > max_tokens:
        notes.append(f"first {max_tokens} of {n_tokens} tokens")
        pattern, tokens, n_tokens = pattern[:max_tokens], list(tokens)[:max_tokens], max_tokens
    vmax = _check_vmax(vmax, pattern)
    note = f" ({', '.join([*notes, vmax[1]])})"

    shown = n_audio if seconds is None else min(n_audio, math.ceil((seconds + CROP_MARGIN) / POSITION_SECONDS))
    pattern_height = max(1.5, 0.17 * n_tokens)
    width = 12.0
    fig = _figure(fig, width, 2.0 + pattern_height + 1.2 + _title_lines(title + note, width) * 0.2)
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
        _max_pool(pattern[:, :shown], n_tokens, 1000),  # at most 1000 time cells, each the maximum of its block
        aspect="auto",
        cmap="viridis",
        vmin=0.0,
        vmax=vmax[0],
        extent=(0, end, n_tokens - 0.5, -0.5),
        interpolation="nearest",
    )
    ax_mel.set_xlim(0, end)
    fig.colorbar(im, cax=cax_att, label="attention weight")
    _token_ticks(ax_att, tokens, "y", pattern_height)
    ax_att.set_ylabel("text token")
    ax_att.set_xlabel("time (s)")
    if shown < n_audio:
        ax_rest.barh(np.arange(n_tokens), pattern[:, shown:].sum(axis=1), height=1.0, color="tab:red")
        ax_rest.set_xlim(0, 1)
        ax_rest.set_ylim(n_tokens - 0.5, -0.5)
        ax_rest.set_yticks([])
        ax_rest.tick_params(labelsize=FONT - 1)
        ax_rest.set_xlabel(f"mass after\n{end:.1f} s", fontsize=FONT)
    else:
        ax_rest.set_axis_off()
    _suptitle(fig, title + note, width)
    return _root(fig)


def layer_lines(
    values: Mapping[str, Sequence[float]],
    *,
    labels: Sequence[str],
    ylabel: str,
    title: str,
    xlabel: str = "layer",
    log: bool = False,
    ax=None,
):
    """A per-layer quantity as lines, one per series: how a measurement evolves with depth.

    ``values`` maps a series name to one number per layer (e.g. the logit lens's top-1 agreement with the
    final output, or its KL divergence to the final distribution), in the order of ``labels`` (the x tick
    labels, e.g. ``["emb", "1", ..., "final"]``). Where a rising agreement curve flattens, later layers
    stop changing the answer. ``log``: a logarithmic y axis, for probabilities that grow by orders of
    magnitude before they matter (values must then be > 0). 7 x 4.5 in, wider for many layers.
    """
    if not values:
        raise ValueError("values is empty: give at least one series name -> [one number per layer]")
    if len(labels) == 0:
        raise ValueError("labels is empty: give one label per layer")
    series = {}
    for name, ys in values.items():
        ys = _array(ys, f"values[{name!r}]")
        if ys.shape != (len(labels),):
            raise ValueError(f"values[{name!r}] has shape {ys.shape} but labels has {len(labels)} entries")
        series[str(name)] = ys
    if log and any(np.any(ys <= 0) for ys in series.values()):
        raise ValueError("log=True needs values > 0 (a logarithmic axis has no zero)")

    ax = _axes(ax, max(7.0, 0.3 * len(labels) + 2.0), 4.5)
    x = np.arange(len(labels))
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", markersize=4, label=name)
    ax.set_xticks(x, [_short(s, TICK_LABEL_CHARS) for s in labels], rotation=90 if len(labels) > 14 else 0,
                  fontsize=FONT)  # fmt: skip
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, parse_math=False)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=FONT - 1 if len(series) > 6 else FONT)
    _plain(ax)
    return _root(ax.figure)


def word_alignment(
    mel,
    matrix,
    dtw_path,
    tokens: Sequence[str],
    words: Sequence[tuple[str, float, float]],
    *,
    title: str = "Word timing: the alignment heads' attention and its DTW path",
    fig=None,
):
    """How words were timed: the alignment heads' attention under the spectrogram, the DTW path and the words.

    ``mel`` [n_mels, frames]: the window's log-mel (frames every 10 ms; only the first ``2 * P``
    are drawn); ``matrix`` [rows, P]: the heads' standardised, filtered, averaged attention over
    the P positions (20 ms each) that hold audio, row k the step predicting text token k and the
    last row EOT (``alignment.Alignment.matrix``); ``dtw_path`` [2, steps]: (row, position)
    pairs (``Alignment.path``); ``tokens`` names the rows; ``words``: (text, start s, end s) drawn
    as spans over the spectrogram and boundaries across both panels. Get all of them for a
    window of a transcript with ``transcribe.window_alignment``. 12 in wide, 0.17 in per row.
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

    seconds = positions * POSITION_SECONDS
    matrix_height = max(1.5, 0.17 * rows)
    fig = _figure(fig, 12.0, 2.4 + matrix_height + 1.0 + _title_lines(title, 12.0) * 0.2)
    ax_mel, ax_att = fig.subplots(2, 1, sharex=True, height_ratios=[2.4, matrix_height])
    ax_mel.imshow(mel[:, : 2 * positions], origin="lower", aspect="auto", cmap="magma",
                  extent=(0, seconds, 0, mel.shape[0]))  # fmt: skip
    ax_mel.set_ylabel("mel bin")
    im = ax_att.imshow(_max_pool(matrix, rows, 1000), aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=(0, seconds, rows - 0.5, -0.5))  # fmt: skip
    fig.colorbar(im, ax=ax_att, label="standardised attention", pad=0.01)
    ax_att.plot((dtw_path[1] + 0.5) * POSITION_SECONDS, dtw_path[0], color="white", linewidth=1.2, label="DTW path")
    inch_per_second = 10.5 / max(seconds, 1e-9)  # about the width of the panels
    level_end: list[float] = []  # where the last word of each row of words ends (seconds)
    for word, start, end in words:
        text = _short(word.strip(), TICK_LABEL_CHARS)
        half = (CHAR_IN * len(text) + 0.08) / inch_per_second / 2  # half the text's width, in seconds
        centre = (start + end) / 2
        level = next((i for i, e in enumerate(level_end) if centre - half > e), len(level_end))
        if level == len(level_end):
            level_end.append(0.0)
        level_end[level] = centre + half
        for ax in (ax_mel, ax_att):
            ax.axvline(start, color="white", linewidth=0.6, linestyle="--", alpha=0.7)
        ax_mel.text(centre, mel.shape[0] * (0.92 - 0.16 * (level % 6)), text, color="white", ha="center",
                    va="top", fontsize=FONT - 1, parse_math=False)  # fmt: skip
    _token_ticks(ax_att, tokens, "y", matrix_height)
    ax_att.set_ylabel("text token (row predicting it)")
    ax_att.set_xlabel("time in the window (s)")
    ax_att.legend(loc="upper right", fontsize=FONT - 1)
    _suptitle(fig, title, 12.0)
    return _root(fig)


def save(fig, path: str | os.PathLike, *, dpi: int = SAVE_DPI) -> Path:
    """Write ``fig`` to ``path`` atomically, in the format its suffix names (png, svg, pdf, ...); returns ``path``.

    The folder must exist; the file is rendered beside it and renamed into place when complete.
    """
    from .files import atomic_write

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    _, FigureCanvasAgg = _matplotlib()
    supported = FigureCanvasAgg(_root(fig)).get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"cannot write a figure as {path.name!r}: give one of .{', .'.join(sorted(supported))}")
    return atomic_write(path, lambda tmp: _root(fig).savefig(tmp, format=fmt, dpi=dpi))


# ----------------------------------------------------------------------------- helpers


def _matplotlib():
    """Import matplotlib's Figure and Agg canvas (no pyplot, so no backend is selected or changed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return Figure, FigureCanvasAgg


def _figure(fig, width: float, height: float):
    """``fig`` (a Figure or SubFigure given by the caller), else a new Figure of ``width x height`` inches."""
    Figure, FigureCanvasAgg = _matplotlib()
    if fig is not None:
        return fig
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # a canvas, so that text can be measured and the figure saved
    return fig


def _axes(ax, width: float, height: float):
    """``ax`` (the caller's), else the one Axes of a new Figure of ``width x height`` inches."""
    return ax if ax is not None else _figure(None, width, height).add_subplot()


def _root(fig):
    """The top-level Figure of a Figure or SubFigure."""
    while getattr(fig, "figure", fig) is not fig and fig.figure is not None:
        fig = fig.figure
    return fig


def _suptitle(fig, title: str, width: float) -> None:
    fig.suptitle("\n".join(textwrap.wrap(title, _title_chars(width))) or title, parse_math=False)


def _title_chars(width: float) -> int:
    return max(20, int(width / (0.0085 * 12)))


def _title_lines(title: str, width: float) -> int:
    return max(1, len(textwrap.wrap(title, _title_chars(width))))


def _plain(ax) -> None:
    """Tick labels as plain text: a token like '$5' is not mathtext."""
    for label in ax.get_xticklabels() + ax.get_yticklabels():
        label.set_parse_math(False)


def _check_vmax(vmax, a: np.ndarray) -> tuple[float, str]:
    """(the colour scale's top, the scale in words for the title): ``vmax`` given (shared with the pictures
    compared) or ``a``'s maximum."""
    if vmax is None:
        top = float(a.max()) or 1.0
        return top, f"colour: 0 to {top:.3g}"
    if not (isinstance(vmax, int | float) and math.isfinite(vmax) and vmax > 0):
        raise ValueError(f"vmax must be a positive number, got {vmax!r}")
    return float(vmax), f"colour: 0 to {vmax:.3g}, one scale for the pictures compared"


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


def _token_ticks(ax, tokens, axis: str, length_in: float) -> None:
    """Label the rows (``axis='y'``) or columns of a token picture ``length_in`` inches long with the tokens'
    text; one label per token when they fit (0.14 in each), else every n-th."""
    n = len(tokens)
    step = max(1, math.ceil(n * 0.14 / length_in))
    ticks = list(range(0, n, step))
    labels = [_short(tokens[t], TICK_LABEL_CHARS) for t in ticks]
    if axis == "y":
        ax.set_yticks(ticks, labels, fontsize=FONT - 1)
    else:
        ax.set_xticks(ticks, labels, fontsize=FONT - 1, rotation=90)
    _plain(ax)


def _short(text, limit: int) -> str:
    """``text`` with whitespace made visible, cut to ``limit`` characters (an ellipsis keeps the start)."""
    text = str(text).translate(VISIBLE_WHITESPACE)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _significant(v: float) -> str:
    """Two significant digits, without a wall of zeros: 0.0031 -> '3.1e-03', 0.25 -> '0.25', 0 -> '0'."""
    if v == 0:
        return "0"
    return f"{v:.2g}" if 1e-2 <= abs(v) < 1e4 else f"{v:.1e}"


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
