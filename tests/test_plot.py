"""Figures: pixel sizes from the documented formulas, visible content, input checks, atomic writes.

Expected pixel sizes are worked out by hand from the sizes documented in ``whisper_lens/plot.py``
(inches x dpi), not read back from the code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from whisper_lens import plot  # noqa: E402

VIRIDIS_TOP = np.array([0.993, 0.906, 0.144])  # viridis(1.0)
VIRIDIS_BOTTOM = np.array([0.267, 0.005, 0.329])  # viridis(0.0)


def png(path: Path) -> np.ndarray:
    """The PNG at ``path`` as (height, width, channels) floats in 0..1, after checking it is a real PNG."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path)


def count_colour(img: np.ndarray, rgb: np.ndarray, tol: float = 0.02) -> int:
    """How many pixels of ``img``'s panels are within ``tol`` of ``rgb`` in every channel.

    Only the left 85% of the image is searched: the colourbar at the right holds every colour of the scale.
    """
    panels = img[:, : int(0.85 * img.shape[1]), :3]
    return int(np.all(np.abs(panels - rgb) < tol, axis=-1).sum())


def has_colour(img: np.ndarray, rgb: np.ndarray, tol: float = 0.02, min_pixels: int = 20) -> bool:
    """Whether at least ``min_pixels`` pixels of ``img``'s panels are within ``tol`` of ``rgb`` in every channel."""
    return count_colour(img, rgb, tol) >= min_pixels


def tokens(n_rows: int, n_cols: int) -> list[list[str]]:
    words = [" the", " cat", "\n", "supercalifragilistic", "$\\bad{$", "EOT"]
    return [[words[(r + c) % len(words)] for c in range(n_cols)] for r in range(n_rows)]


# ----------------------------------------------------------------------------- sizes and content


@pytest.mark.parametrize(
    "n_layers, n_pos, height_px, width_px",
    [
        (4, 5, 300, 600),  # width max(6, 4.25) = 6 in; height max(3, 1 * (0.3*4 + 1.3) + 0.5) = 3.0 in; at 100 dpi
        (13, 30, 570, 1550),  # 0.45*30 + 2 = 15.5 in; 0.3*13 + 1.3 + 0.5 = 5.7 in
        (3, 61, 490, 2000),  # 2 panels of 40: 0.45*40 + 2 = 20 in; 2 * (0.9 + 1.3) + 0.5 = 4.9 in
        (5, 224, 1730, 2000),  # a 224-token transcript: 6 panels, 6 * (1.5 + 1.3) + 0.5 = 17.3 in
    ],
)
def test_lens_heatmap_size(tmp_path, n_layers, n_pos, height_px, width_px):
    prob = np.random.default_rng(0).random((n_layers, n_pos))
    out = plot.lens_heatmap(
        prob,
        tokens(n_layers, n_pos),
        tmp_path / "lens.png",
        layer_labels=["emb"] + [str(i) for i in range(1, n_layers)],
        position_labels=tokens(1, n_pos)[0],
        title="lens of '$5 and $\\bad{'",  # dollar signs are text, not mathtext
    )
    assert out == tmp_path / "lens.png"
    assert png(out).shape[:2] == (height_px, width_px)


def test_lens_heatmap_colour_scale_is_absolute(tmp_path):
    """vmin 0 / vmax 1: an all-ones map is viridis's top colour, an all-zeros map its bottom, not rescaled."""
    ones = png(plot.lens_heatmap(np.ones((3, 4)), tokens(3, 4), tmp_path / "ones.png"))
    zeros = png(plot.lens_heatmap(torch.zeros(3, 4), tokens(3, 4), tmp_path / "zeros.png"))
    assert has_colour(ones, VIRIDIS_TOP, min_pixels=5000) and not has_colour(ones, VIRIDIS_BOTTOM, min_pixels=500)
    assert has_colour(zeros, VIRIDIS_BOTTOM, min_pixels=5000) and not has_colour(zeros, VIRIDIS_TOP, min_pixels=500)


def test_long_lens_wraps_into_legible_cells(tmp_path):
    """224 positions wrap into panels of 40: one yellow cell is still about 40 x 30 pixels (it would be 17 x 60
    in one 40-inch row)."""
    prob = np.zeros((5, 224))
    prob[2, 203] = 1.0
    img = png(plot.lens_heatmap(prob, [[""] * 224] * 5, tmp_path / "lens.png"))
    assert has_colour(img, VIRIDIS_TOP, min_pixels=900)
    assert not has_colour(img, VIRIDIS_TOP, min_pixels=2500)  # one cell, not a column or a row


def test_removal_curves_size_and_clipping(tmp_path):
    curves = {
        "encoder": [(0, 0.02), (1, 0.1), (2, 0.6), (3, 1.2), (4, 7.5)],  # 7.5 is drawn at the top edge
        "decoder": [(0, 0.02), (1, 0.05), (2, 0.3), (3, 0.9), (4, 1.0)],
    }
    out = plot.removal_curves(curves, tmp_path / "removal.png", metric="CER", title="Removing blocks")
    assert png(out).shape[:2] == (540, 840)  # 7 x 4.5 in at 120 dpi


def test_attention_grid_sizes(tmp_path):
    rng = np.random.default_rng(1)
    # 6 heads: 3 columns x 2 rows -> (2.6*3 + 1.2) x (2.4*2 + 0.8) = 9.0 x 5.6 in at 100 dpi
    six = plot.attention_grid(rng.random((6, 9, 9)), tmp_path / "six.png", head_labels=[f"h{i}" for i in range(6)])
    assert png(six).shape[:2] == (560, 900)
    # 1 head: 3.8 x 3.2 in; 20 heads (large-v3): 5 columns x 4 rows = 14.2 x 10.4 in
    assert png(plot.attention_grid(rng.random((1, 4, 4)), tmp_path / "one.png")).shape[:2] == (320, 380)
    assert png(plot.attention_grid(rng.random((20, 5, 5)), tmp_path / "twenty.png")).shape[:2] == (1040, 1420)


def test_attention_grid_cross_1500_keeps_a_one_position_peak(tmp_path):
    """A 1500-wide cross pattern draws; a single-position peak survives the shrink to ~200 pixels."""
    pattern = torch.full((4, 7, 1500), 1e-4)
    pattern[:, 3, 777] = 1.0  # one key position out of 1500, 0.07% of the row
    out = plot.attention_grid(pattern, tmp_path / "cross.png", x_label="audio position", y_label="text token")
    img = png(out)
    assert img.shape[:2] == (560, 640)  # 2 x 2 grid: 6.4 x 5.6 in
    # each head's peak is at least a pixel wide and as tall as its row: well over 4 * 20 pixels in all
    assert has_colour(img, VIRIDIS_TOP, tol=0.05, min_pixels=80)


def test_cross_attention_over_mel_size_and_peak(tmp_path):
    rng = np.random.default_rng(2)
    mel = rng.standard_normal((80, 3000))
    pattern = np.full((12, 1500), 1e-4)
    pattern[np.arange(12), 60 * np.arange(12) + 5] = 1.0  # a staircase of one-position peaks
    out = plot.cross_attention_over_mel(mel, pattern, [f" w{i}" for i in range(12)], tmp_path / "over.png")
    img = png(out)
    assert img.shape[:2] == (540, 1200)  # 12 in x (3 + max(2, 2.4)) in at 100 dpi
    assert has_colour(img, VIRIDIS_TOP, tol=0.05, min_pixels=12 * 10)
    few = plot.cross_attention_over_mel(mel[:, :20], pattern[:5, :10], list("abcde"), tmp_path / "few.png")
    assert png(few).shape[:2] == (500, 1200)  # 3 + 2 in


def test_cross_attention_cropped_to_the_audio(tmp_path):
    """A 3 s clip in a 30 s window: the picture shows 3.5 s, and a bar per token the attention after that."""
    mel = np.zeros((80, 3000))
    pattern = np.zeros((4, 1500))
    pattern[0, 100:110] = 0.1  # 2.0-2.2 s: inside the picture
    pattern[1:, 1400] = 1.0  # at 28 s, on the padding: only in the bars
    first = np.where(np.arange(4)[:, None] == 0, pattern, 0.0)  # the first row alone, the same 4 rows tall
    full = png(plot.cross_attention_over_mel(mel, first, list("abcd"), tmp_path / "full.png"))
    crop = png(plot.cross_attention_over_mel(mel, pattern, list("abcd"), tmp_path / "crop.png", seconds=3.0))
    assert full.shape == crop.shape == (500, 1200, 4)
    # 0.2 s of the row: about 12 in * 0.2 / 30 = 8 pixels wide in 30 s, 8.6 times as wide in 3.5 s
    assert count_colour(crop, VIRIDIS_TOP, tol=0.05) > 5 * count_colour(full, VIRIDIS_TOP, tol=0.05) > 0
    red = np.array([0.839, 0.153, 0.157])  # matplotlib's tab:red: the bars of mass after the picture
    assert count_colour(crop, red, tol=0.02) > 1000 and count_colour(full, red, tol=0.02) == 0


def test_attention_grid_crop(tmp_path):
    square = np.zeros((1, 1500, 1500))
    square[0, 90:110, 140:160] = 1.0  # a 20 x 20 block in the first 200 positions
    cropped = png(plot.attention_grid(square, tmp_path / "crop.png", crop=200))
    whole = png(plot.attention_grid(square, tmp_path / "whole.png"))
    # the block is a tenth of a ~240-pixel panel cropped (~24 x 24 pixels), a 75th of it whole (~3 x 3)
    assert count_colour(cropped, VIRIDIS_TOP, tol=0.05) > count_colour(whole, VIRIDIS_TOP, tol=0.05) + 300


def test_head_grid_size_and_diverging_colours(tmp_path):
    values = {"self-attention": np.zeros((4, 6)), "cross-attention": np.zeros((4, 6))}
    values["self-attention"][0, 3] = 0.5
    values["cross-attention"][3, 2] = -0.5
    img = png(plot.head_grid(values, tmp_path / "heads.png", title="Zeroing one head", label="change"))
    assert img.shape[:2] == (320, 1040)  # 2 * (0.6*6 + 1) + 1.2 = 10.4 in by max(3, 0.45*4 + 1.4) = 3.2 in
    top, bottom = np.array([0.404, 0.0, 0.122]), np.array([0.020, 0.188, 0.380])  # RdBu_r's two ends
    assert has_colour(img, top, tol=0.03, min_pixels=500) and has_colour(img, bottom, tol=0.03, min_pixels=500)


def test_layer_lines_size(tmp_path):
    labels = ["emb", "1", "2", "3", "final"]
    values = {"top-1 agreement": [0.0, 0.2, 0.5, 0.9, 1.0], "KL": torch.tensor([3.0, 2.0, 1.0, 0.4, 0.0])}
    out = plot.layer_lines(values, tmp_path / "lines.png", labels=labels, ylabel="per position", title="Lens")
    assert png(out).shape[:2] == (540, 840)  # 7 x 4.5 in at 120 dpi


def test_bfloat16_tensor_and_helpers():
    assert plot._array(torch.ones(2, 3, dtype=torch.bfloat16), "x").dtype == np.float64
    assert plot._short(" hello world", 6) == "\u2423hell\u2026"
    assert plot._short("a\nb", 6) == "a\u21b5b"
    a = np.zeros((3, 1500))
    a[1, 1499] = 5.0
    pooled = plot._max_pool(a, 200, 200)  # 8 columns per block, 188 blocks (the last one padded)
    assert pooled.shape == (3, 188) and pooled[1, 187] == 5.0 and pooled.sum() == 5.0


# ----------------------------------------------------------------------------- bad input


def test_shape_mismatches_name_both_shapes(tmp_path):
    out = tmp_path / "x.png"
    with pytest.raises(ValueError, match=r"lengths \[5, 5, 4\].*shape \(3, 5\)"):
        plot.lens_heatmap(np.zeros((3, 5)), tokens(2, 5) + [["a"] * 4], out)
    with pytest.raises(ValueError, match=r"position_labels has 4 entries.*shape \(3, 5\)"):
        plot.lens_heatmap(np.zeros((3, 5)), tokens(3, 5), out, position_labels=list("abcd"))
    with pytest.raises(ValueError, match=r"prob must hold probabilities in \[0, 1\]"):
        plot.lens_heatmap(np.full((3, 5), 1.5), tokens(3, 5), out)
    with pytest.raises(ValueError, match=r"head_labels has 2 entries.*shape \(3, 4, 4\)"):
        plot.attention_grid(np.zeros((3, 4, 4)), out, head_labels=["a", "b"])
    with pytest.raises(ValueError, match=r"\[heads, queries, keys\].*shape \(4, 4\)"):
        plot.attention_grid(np.zeros((4, 4)), out)
    with pytest.raises(ValueError, match=r"mel has shape \(80, 3001\) but pattern has shape \(4, 1500\)"):
        plot.cross_attention_over_mel(np.zeros((80, 3001)), np.zeros((4, 1500)), list("abcd"), out)
    with pytest.raises(ValueError, match=r"tokens has 3 entries but pattern has shape \(4, 10\)"):
        plot.cross_attention_over_mel(np.zeros((80, 20)), np.zeros((4, 10)), list("abc"), out)
    with pytest.raises(ValueError, match=r"values\['KL'\] has shape \(4,\) but labels has 5 entries"):
        plot.layer_lines({"KL": [1.0, 2.0, 3.0, 4.0]}, out, labels=list("abcde"), ylabel="y", title="t")
    with pytest.raises(ValueError, match=r"curves\['encoder'\].*\(k, value\) pairs, got shape \(2, 3\)"):
        plot.removal_curves({"encoder": [(0, 1, 2), (1, 2, 3)]}, out)
    with pytest.raises(ValueError, match="curves is empty"):
        plot.removal_curves({}, out)
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_and_wrong_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"output folder .*nowhere does not exist"):
        plot.removal_curves({"decoder": [(0, 0.1)]}, tmp_path / "nowhere" / "r.png")
    with pytest.raises(ValueError, match=r"ending in \.png"):
        plot.removal_curves({"decoder": [(0, 0.1)]}, tmp_path / "r.jpg")
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes `import matplotlib.figure` fail
    with pytest.raises(ImportError, match=r"pip install 'whisper-lens\[plot\]'"):
        plot.layer_lines({"a": [1.0]}, tmp_path / "a.png", labels=["emb"], ylabel="y", title="t")


# ----------------------------------------------------------------------------- atomic writes, no global state


def test_write_is_atomic(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = tmp_path / "lines.png"
    plot.layer_lines({"a": [0.0, 1.0]}, out, labels=["emb", "final"], ylabel="y", title="first")
    before = out.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["lines.png"]

    def half_written(self, f, *args, **kwargs):
        f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", half_written)
    with pytest.raises(OSError, match="disk full"):
        plot.layer_lines({"a": [1.0, 0.0]}, out, labels=["emb", "final"], ylabel="y", title="second")
    assert out.read_bytes() == before  # the old picture is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["lines.png"]  # and no temporary file is left


def test_no_pyplot_and_backend_untouched(tmp_path):
    """The figures never import pyplot, so a user's backend choice and open windows are not disturbed."""
    code = (
        "import sys, matplotlib; matplotlib.use('pdf'); from whisper_lens import plot; "
        f"plot.layer_lines({{'a': [1.0, 2.0]}}, {str(tmp_path / 'a.png')!r}, "
        "labels=['x', 'y'], ylabel='y', title='t'); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; "
        "assert matplotlib.get_backend() == 'pdf', matplotlib.get_backend()"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert png(tmp_path / "a.png").shape[:2] == (540, 840)
