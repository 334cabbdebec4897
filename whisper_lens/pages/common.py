"""Pieces every page shares: arrays as compact base64, inlined audio and pictures, the page shell, notebook display.

A page is one HTML file that opens from disk with no server and no internet: its scripts and styles
are inlined, its numbers live in one JSON blob (``<script type="application/json" id="wl-data">``)
that the page's script (and a test) reads back, and its sound and pictures are data: URIs.

Arrays travel as ``encode_array`` dicts: quantised to 16 (or 8) bits over their own range (16 bits as
byte planes: all low bytes, then all high bytes), or kept as float16/float32; then zlib-compressed and
base64-encoded. ``COMMON_JS`` holds ``wlDecode(spec)``, the
browser side (``DecompressionStream``, built into Chromium, Firefox and Safari), which gives back a
``Float32Array``. A 16-bit quantisation of values in [lo, hi] is off by at most (hi - lo) / 131070:
7.6e-6 for attention weights in [0, 1].
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import zlib
from pathlib import Path

import numpy as np

QUANTISED = {"u16": ("<u2", 65535), "u8": ("u1", 255)}
FLOATS = {"f16": "<f2", "f32": "<f4"}
AUDIO_RATE = 16000  # the samples' rate given to audio_data_uri (Whisper's)
OPUS_BITRATE = 24000  # bits per second of the inlined speech: about 3 kB a second


def encode_array(a, kind: str = "u16") -> dict:
    """``a`` (numpy or torch, any shape) as a JSON-ready dict that ``wlDecode`` turns back into a Float32Array.

    ``kind``: ``u16`` / ``u8`` (linear quantisation over [min, max], max error (max - min) / 131070 or / 510),
    ``f16`` or ``f32``. The bytes are zlib-compressed (attention is mostly near-zero and packs well).
    """
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    a = np.asarray(a, dtype=np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError("encode_array: the array holds a NaN or an infinity")
    spec: dict = {"shape": list(a.shape), "kind": kind}
    if kind in QUANTISED:
        dtype, top = QUANTISED[kind]
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        scale = (hi - lo) / top if hi > lo else 1.0
        q = np.rint((a - lo) / scale).astype(dtype)
        raw = q.view(np.uint8).reshape(-1, q.itemsize).T.tobytes()  # byte planes: the high bytes, mostly 0, pack
        spec |= {"lo": lo, "scale": scale}
    elif kind in FLOATS:
        raw = a.astype(FLOATS[kind]).tobytes()
    else:
        raise ValueError(f"kind must be one of {[*QUANTISED, *FLOATS]}, got {kind!r}")
    spec["b64"] = base64.b64encode(zlib.compress(raw, 9)).decode("ascii")
    return spec


def decode_array(spec: dict) -> np.ndarray:
    """The float32 array an ``encode_array`` dict holds (what the page's ``wlDecode`` computes, in numpy)."""
    raw = zlib.decompress(base64.b64decode(spec["b64"]))
    kind = spec["kind"]
    if kind in QUANTISED:
        dtype = np.dtype(QUANTISED[kind][0])
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(dtype.itemsize, -1)  # (bytes, n)
        q = np.ascontiguousarray(planes.T).view(dtype)[:, 0].astype(np.float64)
        a = spec["lo"] + q * spec["scale"]
    else:
        a = np.frombuffer(raw, dtype=FLOATS[kind])
    return a.astype(np.float32).reshape(spec["shape"])


def audio_data_uri(samples, rate: int = AUDIO_RATE) -> str:
    """Mono float samples in [-1, 1] as a data: URI: Opus in Ogg (PyAV; ~3 kB/s), else 16-bit WAV at 8 kHz."""
    samples = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
    pcm = (samples * 32767).astype(np.int16)
    try:
        return "data:audio/ogg;base64," + base64.b64encode(_opus(pcm, rate)).decode("ascii")
    except Exception:  # PyAV missing or built without libopus: a plain WAV plays everywhere
        return "data:audio/wav;base64," + base64.b64encode(_wav(pcm, rate)).decode("ascii")


def _opus(pcm: np.ndarray, rate: int) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=48000)
        stream.bit_rate = OPUS_BITRATE
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate = rate
        resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
        for f in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _wav(pcm: np.ndarray, rate: int) -> bytes:
    import wave

    step = max(1, rate // 8000)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate // step)
        w.writeframes(pcm[::step].tobytes())
    return buf.getvalue()


def image_data_uri(a, cmap: str = "magma", vmin: float | None = None, vmax: float | None = None,
                   flip: bool = True) -> str:  # fmt: skip
    """A 2-D array as a PNG data: URI, one pixel per value, coloured by ``cmap`` (row 0 at the bottom if ``flip``).

    The PNG is palette-based (256 colours of ``cmap``): a third of an RGB one's size, the same picture.
    """
    import matplotlib
    from PIL import Image

    a = np.asarray(a.detach().float().cpu() if hasattr(a, "detach") else a, dtype=np.float64)
    lo = float(a.min()) if vmin is None else vmin
    hi = float(a.max()) if vmax is None else vmax
    index = np.clip(np.rint((a - lo) / ((hi - lo) or 1.0) * 255), 0, 255).astype(np.uint8)  # (rows, cols)
    index = np.ascontiguousarray(index[::-1] if flip else index)
    image = Image.frombytes("P", (index.shape[1], index.shape[0]), index.tobytes())
    palette = (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    image.putpalette(palette.reshape(-1).tolist())
    buf = io.BytesIO()
    image.save(buf, format="png", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def script_safe(text: str) -> str:
    """``text`` safe inside a <script> element: no ``</`` closes it early, no ``<!--`` opens a comment."""
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


GENERATOR = "whisper-lens"  # <meta name="generator">: how write_page knows a page it may replace


def page(title: str, body: str, *, data: dict, css: str = "", js: str = "") -> str:
    """One self-contained HTML document: ``COMMON_CSS`` + ``css``, ``body``, the data blob, ``COMMON_JS`` + ``js``."""
    blob = script_safe(json.dumps(data, separators=(",", ":"), allow_nan=False))
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='generator' content='{GENERATOR}'>"
        f"<title>{html.escape(title)}</title>\n<style>{COMMON_CSS}{css}</style></head>\n<body>\n{body}\n"
        f"<script type='application/json' id='wl-data'>{blob}</script>\n"
        f"<script>{script_safe(COMMON_JS)}\n{script_safe(js)}</script>\n</body></html>\n"
    )


def write_page(path: str | os.PathLike, text: str) -> Path:
    """Write a page atomically (``files.write_text``). The folder must exist; an existing file is replaced
    only when it is a page whisper-lens wrote (its generator tag), never another file."""
    from ..files import write_text

    return write_text(check_page_path(path), text)


def check_page_path(path: str | os.PathLike) -> Path:
    """``path`` if a page may be written there (an .html name, an existing folder, nothing foreign in the way)."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"a page is an HTML file: give a path ending in .html, not {path}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
    if path.exists() or path.is_symlink():
        if not path.is_file() or f"<meta name='generator' content='{GENERATOR}'>" not in _head(path):
            raise FileExistsError(f"{path} exists and is not a page whisper-lens wrote: not replacing it")
    return path


def _head(path: Path) -> str:
    with open(path, "rb") as f:
        return f.read(400).decode("utf-8", "replace")


class Inline:
    """A page shown inline in Jupyter (``_repr_html_``: an iframe whose ``srcdoc`` is the page); ``save`` writes it."""

    def __init__(self, html_text: str, height: int = 900) -> None:
        self.html = html_text
        self.height = height

    def _repr_html_(self) -> str:
        return (f"<iframe srcdoc=\"{html.escape(self.html, quote=True)}\" style='width:100%;height:{self.height}px;"
                "border:1px solid #ccc' sandbox='allow-scripts'></iframe>")  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        return write_page(path, self.html)


COMMON_CSS = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:18px 0 6px}
.note{color:#666;font-size:12px}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}
canvas{image-rendering:pixelated}
"""

COMMON_JS = r"""
"use strict";
// The page's data: the JSON blob written with it.
const WL_DATA = JSON.parse(document.getElementById('wl-data').textContent);
// An encode_array dict -> {shape, data: Float32Array}; async (zlib through DecompressionStream).
async function wlDecode(spec) {
  const bin = atob(spec.b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate'));
  const buf = await new Response(stream).arrayBuffer();
  let out;
  if (spec.kind === 'u16' || spec.kind === 'u8') {
    const b = new Uint8Array(buf), n = spec.kind === 'u16' ? b.length / 2 : b.length;
    out = new Float32Array(n);
    if (spec.kind === 'u16') {  // byte planes: n low bytes, then n high bytes
      for (let i = 0; i < n; i++) out[i] = spec.lo + (b[i] | (b[n + i] << 8)) * spec.scale;
    } else {
      for (let i = 0; i < n; i++) out[i] = spec.lo + b[i] * spec.scale;
    }
  } else if (spec.kind === 'f32') {
    out = new Float32Array(buf);
  } else {  // f16
    const h = new Uint16Array(buf);
    out = new Float32Array(h.length);
    for (let i = 0; i < h.length; i++) {
      const s = h[i] & 0x8000 ? -1 : 1, e = (h[i] >> 10) & 31, f = h[i] & 1023;
      out[i] = e === 0 ? s * f * 2 ** -24 : e === 31 ? (f ? NaN : s * Infinity) : s * (1 + f / 1024) * 2 ** (e - 15);
    }
  }
  return {shape: spec.shape, data: out};
}
// viridis, sampled: t in [0, 1] -> 'rgb(...)' (for canvases drawn by the page).
const WL_VIRIDIS = [[68,1,84],[72,40,120],[62,74,137],[49,104,142],[38,130,142],[31,158,137],[53,183,121],
                    [109,205,89],[180,222,44],[253,231,37]];
function wlColour(t) {
  t = Math.min(1, Math.max(0, t)) * (WL_VIRIDIS.length - 1);
  const i = Math.min(WL_VIRIDIS.length - 2, Math.floor(t)), f = t - i, a = WL_VIRIDIS[i], b = WL_VIRIDIS[i + 1];
  return [0, 1, 2].map(k => Math.round(a[k] + f * (b[k] - a[k])));
}
// Text for HTML: escape & < > " '.
function wlEscape(s) {
  return String(s).replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
}
"""
