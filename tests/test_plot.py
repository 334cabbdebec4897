"""Figures: every plot returns a Figure that is readable at tiny and large sizes, shows its content, checks its input.

Readable is checked from the Figure itself, with matplotlib's text extents after a draw: every text
drawn (tick labels, titles, cell text, annotations, legends) lies inside the figure, and no two
overlap. Each plot is drawn at 1 token / position / layer and at 224 tokens, 30 s of audio, 32 layers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from whisper_lens import plot  # noqa: E402

VIRIDIS_TOP = np.array([0.993, 0.906, 0.144])  # viridis(1.0)
VIRIDIS_BOTTOM = np.array([0.267, 0.005, 0.329])  # viridis(0.0)
WORDS = [" the", " cat", "\n", " supercalifragilistic", "$\\bad{$", "EOT", " 😀", "<|23.20|>", " leisure"]


def tokens(n: int) -> list[str]:
    return [WORDS[i % len(WORDS)] for i in range(n)]


def drawn_texts(fig: Figure) -> list[tuple[str, object]]:
    """(text, window extent) of every non-empty text the figure draws, tick labels of drawn ticks only."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks, out = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                ticks.update({id(tick.label1), id(tick.label2)})
            if not (ax.axison and axis.get_visible()):
                continue
            for tick in axis._update_ticks():  # the ticks inside the view: the ones drawn
                for label in (tick.label1, tick.label2):
                    if label.get_visible() and label.get_text().strip():
                        out.append((label.get_text(), label.get_window_extent(renderer)))
    for t in fig.findobj(Text):
        if id(t) in ticks or not t.get_visible() or not t.get_text().strip():
            continue
        out.append((t.get_text(), t.get_window_extent(renderer)))
    return out


def assert_readable(fig: Figure) -> None:
    """No text outside the figure (cut), no two texts overlapping (1 px of slack)."""
    assert isinstance(fig, Figure)
    w, h = fig.canvas.get_width_height()
    texts = drawn_texts(fig)
    assert texts
    for text, bb in texts:
        assert bb.x0 >= -1 and bb.y0 >= -1 and bb.x1 <= w + 1 and bb.y1 <= h + 1, f"{text!r} cut: {bb} in {w}x{h}"
    boxes = np.array([[bb.x0, bb.y0, bb.x1, bb.y1] for _, bb in texts])  # (N, 4)
    dx = np.minimum(boxes[:, None, 2], boxes[None, :, 2]) - np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    dy = np.minimum(boxes[:, None, 3], boxes[None, :, 3]) - np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    overlap = (dx > 1) & (dy > 1)
    np.fill_diagonal(overlap, False)
    i, j = np.nonzero(overlap)
    assert len(i) == 0, f"{len(i) // 2} overlapping texts, e.g. {texts[i[0]][0]!r} and {texts[j[0]][0]!r}"


def pixels(fig: Figure) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0


def count_colour(img: np.ndarray, rgb: np.ndarray, tol: float = 0.02) -> int:
    """Pixels of the left 85% of ``img`` (the colourbar at the right holds every colour) within ``tol`` of ``rgb``."""
    panels = img[:, : int(0.85 * img.shape[1])]
    return int(np.all(np.abs(panels - rgb) < tol, axis=-1).sum())


def words(n: int, seconds: float) -> list[tuple[str, float, float]]:
    step = seconds / n
    return [(tokens(n)[i], i * step, (i + 1) * step) for i in range(n)]


rng = np.random.default_rng(0)
FIGURES = {
    "lens 1": lambda: plot.lens_heatmap(rng.random((1, 1)), [["x"]]),
    "lens 224": lambda: plot.lens_heatmap(
        rng.random((5, 224)),
        [tokens(224)] * 5,
        position_labels=tokens(224),
        layer_labels=["emb", "1", "2", "3", "4 (final)"],
        title="Decoder logit lens: " + "a long transcript " * 12,
    ),  # fmt: skip
    "lens 33 layers": lambda: plot.lens_heatmap(rng.random((33, 7)), [tokens(7)] * 33),
    "removal 1": lambda: plot.removal_curves({"encoder": [(0, 0.1)]}),
    "removal 32": lambda: plot.removal_curves(
        {"encoder": [(k, 0.2 * k) for k in range(33)], "decoder": [(k, 5.0 + k) for k in range(33)]}
    ),  # fmt: skip
    "grid 1": lambda: plot.attention_grid(np.ones((1, 1, 1)), query_labels=["a"], key_labels=["a"]),
    "grid self 224": lambda: plot.attention_grid(
        rng.random((6, 224, 224)),
        query_labels=tokens(224),
        key_labels=tokens(224),
        title="decoder.blocks.3.attn.pattern",
    ),
    "grid cross 30 s": lambda: plot.attention_grid(
        rng.random((8, 224, 1500)), query_labels=tokens(224), key_seconds=0.02, vmax=2.0
    ),  # fmt: skip
    "grid encoder 30 s": lambda: plot.attention_grid(rng.random((4, 1500, 1500)).astype(np.float32), key_seconds=0.02),
    "grid 20 heads": lambda: plot.attention_grid(rng.random((20, 5, 5))),
    "heads 1": lambda: plot.head_grid({"self": np.zeros((1, 1))}),
    "heads 32x20": lambda: plot.head_grid(
        {"self": rng.normal(size=(32, 20)) * 1e-3, "cross": rng.normal(size=(32, 20))}
    ),  # fmt: skip
    "over mel 1": lambda: plot.cross_attention_over_mel(np.zeros((80, 2)), np.ones((1, 1)), ["a"], vmax=0.5),
    "grid 1 shared": lambda: plot.attention_grid(np.ones((1, 1, 1)), vmax=0.5, title="a title " * 5),
    "over mel 224, 30 s": lambda: plot.cross_attention_over_mel(
        rng.random((80, 3000)), rng.random((224, 1500)), tokens(224), seconds=30.0
    ),  # fmt: skip
    "over mel cropped": lambda: plot.cross_attention_over_mel(
        rng.random((80, 3000)), rng.random((5, 1500)), tokens(5), seconds=3.0
    ),  # fmt: skip
    "lines 1": lambda: plot.layer_lines({"a": [1.0]}, labels=["emb"], ylabel="y", title="t"),
    "lines 33": lambda: plot.layer_lines(
        {f"series {i}": rng.random(33) + 0.1 for i in range(8)},
        labels=["emb"] + [str(i) for i in range(1, 32)] + ["32 (final)"],
        ylabel="p",
        title="per layer",
        log=True,
    ),  # fmt: skip
    "words 1": lambda: plot.word_alignment(
        np.zeros((80, 4)), np.ones((1, 2)), np.zeros((2, 2)), ["a"], [("a", 0.0, 0.04)]
    ),  # fmt: skip
    "words 224, 30 s": lambda: plot.word_alignment(
        rng.random((80, 3000)),
        rng.random((224, 1500)),
        np.stack([np.arange(224), np.arange(224) * 6]),
        tokens(224),
        words(90, 30.0),
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_plot_is_readable_at_tiny_and_large_sizes(name):
    assert_readable(FIGURES[name]())


def test_plots_draw_into_the_callers_axes_and_figures():
    fig = Figure(figsize=(14, 5), layout="constrained")
    left, right = fig.subplots(1, 2)
    assert plot.removal_curves({"decoder": [(0, 0.1), (1, 0.4)]}, ax=left) is fig
    assert plot.layer_lines({"a": [0.0, 1.0]}, labels=["emb", "final"], ylabel="y", title="t", ax=right) is fig
    assert [len(ax.lines) for ax in fig.axes] == [1, 1]
    outer = Figure(figsize=(16, 6), layout="constrained")
    a, b = outer.subfigures(1, 2)
    assert plot.attention_grid(np.ones((2, 3, 3)) / 3, fig=a) is outer
    assert plot.head_grid({"self": np.zeros((2, 2))}, fig=b) is outer
    assert len(outer.axes) == 2 + 1 + 1 + 1  # two heads and a colourbar, one panel and a colourbar


def test_save_writes_any_matplotlib_format_atomically(tmp_path, monkeypatch):
    fig = plot.layer_lines({"a": [0.0, 1.0]}, labels=["emb", "final"], ylabel="y", title="t")
    assert plot.save(fig, tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in plot.save(fig, tmp_path / "a.svg").read_bytes()[:400]
    assert plot.save(fig, tmp_path / "a.pdf").read_bytes()[:4] == b"%PDF"
    with pytest.raises(ValueError, match=r"cannot write a figure as 'a\.doc'"):
        plot.save(fig, tmp_path / "a.doc")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot.save(fig, tmp_path / "nowhere" / "a.png")
    before = (tmp_path / "a.png").read_bytes()

    def half_written(self, *args, **kwargs):
        Path(args[0]).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="disk full"):
        plot.save(fig, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pdf", "a.png", "a.svg"]


# ----------------------------------------------------------------------------- content


def test_lens_heatmap_colour_scale_is_absolute():
    """vmin 0 / vmax 1: an all-ones map is viridis's top colour, an all-zeros map its bottom, not rescaled."""
    ones = pixels(plot.lens_heatmap(np.ones((3, 4)), [tokens(4)] * 3))
    zeros = pixels(plot.lens_heatmap(torch.zeros(3, 4), [tokens(4)] * 3))
    assert count_colour(ones, VIRIDIS_TOP) > 5000 and count_colour(ones, VIRIDIS_BOTTOM) < 500
    assert count_colour(zeros, VIRIDIS_BOTTOM) > 5000 and count_colour(zeros, VIRIDIS_TOP) < 500


def test_long_lens_wraps_into_panels_of_40():
    fig = plot.lens_heatmap(np.zeros((5, 224)), [[""] * 224] * 5)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 6 and panels[0].get_title(loc="left") == "positions 0-39"


def test_shared_colour_scale_is_applied_and_stated():
    """Two pictures compared with one vmax: a weight of 0.1 under vmax 1 is dark, and the colourbar says shared."""
    pattern = np.full((2, 3, 3), 0.1)
    own = plot.attention_grid(pattern)
    shared = plot.attention_grid(pattern, vmax=1.0)
    assert count_colour(pixels(own), VIRIDIS_TOP) > 1000 and count_colour(pixels(shared), VIRIDIS_TOP) == 0
    assert "(colour: 0 to 1, one scale for the pictures compared)" in shared.get_suptitle().replace("\n", " ")
    assert "(colour: 0 to 0.1)" in own.get_suptitle()
    with pytest.raises(ValueError, match="vmax must be a positive number"):
        plot.cross_attention_over_mel(np.zeros((80, 4)), np.ones((1, 2)) / 2, ["a"], vmax=0.0)


def test_long_transcripts_are_cropped_and_the_crop_is_stated():
    fig = plot.cross_attention_over_mel(np.zeros((80, 40)), np.ones((224, 20)) / 20, tokens(224))
    assert "(first 48 of 224 tokens, colour: 0 to 0.05)" in fig.get_suptitle()
    att = fig.axes[3]  # the attention panel: 48 rows
    assert att.get_ylim() == (47.5, -0.5)


def test_audio_axes_are_in_seconds_and_text_axes_carry_tokens():
    fig = plot.attention_grid(np.ones((1, 3, 1500)) / 1500, query_labels=[" he", " was", "."], key_seconds=0.02)
    ax = fig.axes[0]
    assert ax.get_xlim() == (0.0, 30.0) and ax.get_xlabel() == "time (s)"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["\u2423he", "\u2423was", "."]


def test_attention_grid_cross_1500_keeps_a_one_position_peak():
    pattern = torch.full((4, 7, 1500), 1e-4)
    pattern[:, 3, 777] = 1.0  # one key position out of 1500
    assert count_colour(pixels(plot.attention_grid(pattern)), VIRIDIS_TOP, tol=0.05) >= 40


def test_cross_attention_cropped_to_the_audio():
    """A 3 s clip in a 30 s window: the picture shows 3.5 s, and a bar per token the attention after that."""
    mel, pattern = np.zeros((80, 3000)), np.zeros((4, 1500))
    pattern[0, 100:110] = 0.1  # 2.0-2.2 s: inside the picture
    pattern[1:, 1400] = 1.0  # at 28 s, on the padding: only in the bars
    first = np.where(np.arange(4)[:, None] == 0, pattern, 0.0)
    full = pixels(plot.cross_attention_over_mel(mel, first, list("abcd")))
    crop = pixels(plot.cross_attention_over_mel(mel, pattern, list("abcd"), seconds=3.0, vmax=0.1))
    assert count_colour(crop, VIRIDIS_TOP, tol=0.05) > 5 * count_colour(full, VIRIDIS_TOP, tol=0.05) > 0
    red = np.array([0.839, 0.153, 0.157])  # matplotlib's tab:red: the bars of mass after the picture
    assert count_colour(crop, red) > 1000 and count_colour(full, red) == 0


def test_head_grid_diverging_colours_and_significant_digits():
    values = {"self-attention": np.zeros((4, 6)), "cross-attention": np.zeros((4, 6))}
    values["self-attention"][0, 3] = 0.5
    values["cross-attention"][3, 2] = -0.5
    values["cross-attention"][1, 1] = 0.0031
    fig = plot.head_grid(values, title="Zeroing one head", label="change")
    img = pixels(fig)
    top, bottom = np.array([0.404, 0.0, 0.122]), np.array([0.020, 0.188, 0.380])  # RdBu_r's two ends
    assert count_colour(img, top, tol=0.03) > 500 and count_colour(img, bottom, tol=0.03) > 500
    cells = {t.get_text() for t in fig.axes[1].texts}
    assert {"0.5", "-0.5", "3.1e-03", "0"} <= cells | {t.get_text() for t in fig.axes[0].texts}


def test_helpers():
    assert plot._array(torch.ones(2, 3, dtype=torch.bfloat16), "x").dtype == np.float64
    assert plot._short(" hello world", 6) == "\u2423hell\u2026"
    assert plot._short("a\nb", 6) == "a\u21b5b"
    assert [plot._significant(v) for v in (0.0, 0.25, 0.0031, 12345.0)] == ["0", "0.25", "3.1e-03", "1.2e+04"]
    a = np.zeros((3, 1500))
    a[1, 1499] = 5.0
    pooled = plot._max_pool(a, 200, 200)  # 8 columns per block, 188 blocks (the last one padded)
    assert pooled.shape == (3, 188) and pooled[1, 187] == 5.0 and pooled.sum() == 5.0


# ----------------------------------------------------------------------------- bad input


def test_shape_mismatches_name_both_shapes():
    with pytest.raises(ValueError, match=r"lengths \[5, 5, 4\].*shape \(3, 5\)"):
        plot.lens_heatmap(np.zeros((3, 5)), [tokens(5)] * 2 + [["a"] * 4])
    with pytest.raises(ValueError, match=r"position_labels has 4 entries.*shape \(3, 5\)"):
        plot.lens_heatmap(np.zeros((3, 5)), [tokens(5)] * 3, position_labels=list("abcd"))
    with pytest.raises(ValueError, match=r"prob must hold probabilities in \[0, 1\]"):
        plot.lens_heatmap(np.full((3, 5), 1.5), [tokens(5)] * 3)
    with pytest.raises(ValueError, match=r"head_labels has 2 entries.*shape \(3, 4, 4\)"):
        plot.attention_grid(np.zeros((3, 4, 4)), head_labels=["a", "b"])
    with pytest.raises(ValueError, match=r"query_labels has 2 entries.*shape \(3, 4, 4\)"):
        plot.attention_grid(np.zeros((3, 4, 4)), query_labels=["a", "b"])
    with pytest.raises(ValueError, match=r"\[heads, queries, keys\].*shape \(4, 4\)"):
        plot.attention_grid(np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"mel has shape \(80, 3001\) but pattern has shape \(4, 1500\)"):
        plot.cross_attention_over_mel(np.zeros((80, 3001)), np.zeros((4, 1500)), list("abcd"))
    with pytest.raises(ValueError, match=r"tokens has 3 entries but pattern has shape \(4, 10\)"):
        plot.cross_attention_over_mel(np.zeros((80, 20)), np.zeros((4, 10)), list("abc"))
    with pytest.raises(ValueError, match=r"values\['KL'\] has shape \(4,\) but labels has 5 entries"):
        plot.layer_lines({"KL": [1.0, 2.0, 3.0, 4.0]}, labels=list("abcde"), ylabel="y", title="t")
    with pytest.raises(ValueError, match=r"curves\['encoder'\].*\(k, value\) pairs, got shape \(2, 3\)"):
        plot.removal_curves({"encoder": [(0, 1, 2), (1, 2, 3)]})
    with pytest.raises(ValueError, match="curves is empty"):
        plot.removal_curves({})


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes `import matplotlib.figure` fail
    with pytest.raises(ImportError, match=r"pip install 'whisper-lens\[plot\]'"):
        plot.layer_lines({"a": [1.0]}, labels=["emb"], ylabel="y", title="t")


def test_no_pyplot_and_backend_untouched(tmp_path):
    """The figures never import pyplot, so a user's backend choice and open windows are not disturbed."""
    code = (
        "import sys, matplotlib; matplotlib.use('pdf'); from whisper_lens import plot; "
        "fig = plot.layer_lines({'a': [1.0, 2.0]}, labels=['x', 'y'], ylabel='y', title='t'); "
        f"plot.save(fig, {str(tmp_path / 'a.png')!r}); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; "
        "assert matplotlib.get_backend() == 'pdf', matplotlib.get_backend()"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
