"""Feature pages: what makes an SAE latent, a neuron or a head fire, across a folder of clips, to listen to.

``feature_data(model, clips, name=..., sae=...)`` runs every clip once (greedy transcript, word times
on the alignment heads, one traced teacher-forced pass) and gathers, per feature:

- its top-k moments: the k clips where it peaks highest, each with the peak's time, the snippet
  around it (+-0.5 s), the activation over the snippet and the words spoken then (decoder features:
  the token at the peak and its neighbours);
- a histogram of its non-zero activations, its density (the share of positions where it is active)
  and its maximum.

What a feature is follows ``name`` and ``sae``: with an SAE, its latents at ``name`` (spliced in with
the error term, ``Edits.splice``: the model runs unchanged); at ``*.attn.z`` / ``*.cross_attn.z``, the
heads (a head's activation at a position is the norm of its output there); anywhere else, the
activation's own features (``mlp.post``: the neurons). Encoder features live at audio positions
(20 ms each); decoder features at token positions, timed by their word.

The page (``features_html``) holds each clip's audio once (Opus, ~3 kB/s, ``common.audio_data_uri``) and
its log-mel spectrogram once (8-bit); a snippet's player is cut from its clip in the browser (a WAV of
exactly the snippet) when its feature is opened, so a page of 1,000 features stays small. It exposes
``window.features`` (``ready``, ``data``, ``open(i)``, ``filter(text)``) for tests.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..audio import HOP_LENGTH, SAMPLE_RATE, load_audio, load_windows
from ..model import Whisper
from .common import audio_data_uri, check_page_path, encode_array, page, write_page

POSITION_SECONDS = 2 * HOP_LENGTH / SAMPLE_RATE  # 0.02 s: one encoder position
MEL_SECONDS = HOP_LENGTH / SAMPLE_RATE  # 0.01 s: one mel frame
SNIPPET = 0.5  # seconds either side of a peak
BINS = 24  # histogram bins


def feature_source(model: Whisper, name: str, sae=None):
    """What to trace and splice for ``name``, and how to read ``[B, T, F]`` activations out of the trace.

    Returns ``(trace names, edits, read(trace) -> [B, T, F], n_features, kind)`` with kind "latent",
    "head" or "neuron" (any activation's last axis).
    """
    from ..trace import Edits

    shapes = model.shapes(1, 1)
    if name not in shapes:
        from ..trace import _closest

        raise KeyError(f"no activation {name!r}; closest: {_closest(name, list(shapes))}")
    if name.endswith((".scores", ".pattern")):
        raise ValueError(f"{name}: heads come before positions there; for heads give the layer's .z ({name[:-7]}z)")
    if sae is not None:
        latents = f"{name}.sae.latents"
        edits = Edits().splice(name, sae)
        return [latents], edits, lambda tr: tr[latents], edits.spliced()[latents].d_sae, "latent"
    if name.endswith(".z"):  # [B, T, H, Dh]: a head's activation is the norm of its output
        return [name], None, lambda tr: tr[name].float().norm(dim=-1), shapes[name][2], "head"
    if len(shapes[name]) != 3:
        raise ValueError(f"{name} has shape {list(shapes[name])}: features need [B, T, F]")
    return [name], None, lambda tr: tr[name], shapes[name][-1], "neuron"


@torch.no_grad()
def collect(model: Whisper, clips, name: str, sae=None, *, batch_size: int = 8, progress: bool = False):
    """Run every clip: per clip its record (audio, mel, words, tokens) and its activations ``[positions, F]``."""
    from tqdm import tqdm

    from ..alignment import align
    from ..study import prompt_tokens
    from .explorer import token_texts

    if model.tokenizer is None:
        raise ValueError("feature pages need a tokenizer (for the words): load_model(..., tokenizer=path)")
    names, edits, read, n_features, kind = feature_source(model, name, sae)
    decoder = name.startswith("decoder.")
    tok, d = model.tokenizer, model.dims
    heads = [tuple(h) for h in model.alignment_heads or []]
    records, acts = [], []
    bar = tqdm(total=len(clips), desc="features", unit="clip", disable=not progress)
    for at in range(0, len(clips), batch_size):
        batch = clips[at : at + batch_size]
        audios = [load_audio(c.path) for c in batch]
        mels, seconds = load_windows(audios, d.n_mels, 2 * d.n_audio_ctx)  # (B, n_mels, frames)
        mels = mels.to(model.device, model.dtype)
        results = model.generate(mels)
        texts = [[t for t in r.tokens if t < tok.eot] for r in results]
        prompts = [prompt_tokens(model, r.language) for r in results]
        seqs = [p + t for p, t in zip(prompts, texts, strict=True)]
        T = max(map(len, seqs))
        tokens = torch.tensor([s + [s[-1]] * (T - len(s)) for s in seqs], device=model.device)  # (B, T): padded
        run = model.run(mels, tokens, trace=[*names, "encoder.ln_post"], edits=edits)  # causal: padding is harmless
        values = read(run.trace).float().cpu()  # (B, T', F)
        frames = [min(int(round(s * SAMPLE_RATE / HOP_LENGTH)), 2 * d.n_audio_ctx) for s in seconds]
        timed = [i for i, t in enumerate(texts) if t] if heads else []
        words = [[] for _ in batch]
        if timed:
            xa = run.trace["encoder.ln_post"][timed]  # (B', S, D)
            found = align(model, xa, [texts[i] for i in timed], [frames[i] for i in timed], heads, tok.sot_sequence)
            for i, a in zip(timed, found, strict=True):
                words[i] = _words(a.words, tok.eot)
        for i, clip in enumerate(batch):
            record = {"clip": clip.id, "seconds": round(float(seconds[i]), 3), "text": results[i].text.strip(),
                      "audio": audios[i], "mel": mels[i, :, : max(1, frames[i])].float().cpu().numpy(),
                      "words": words[i]}  # fmt: skip
            if decoder:
                first = len(prompts[i])
                record["tokens"] = token_texts(tok, texts[i])
                record["token_times"] = _token_times(words[i], len(texts[i]), float(seconds[i]))
                x = values[i, first : first + len(texts[i])]  # (n_text, F): the position each token is fed at
            else:
                x = values[i, : min(d.n_audio_ctx, max(1, math.ceil(seconds[i] / POSITION_SECONDS)))]  # (P, F)
            records.append(record)
            acts.append(x.to(torch.float16 if x.abs().max() < 6e4 else torch.float32).numpy())
        bar.update(len(batch))
    bar.close()
    return records, acts, n_features, kind


def _words(timings, eot: int) -> list[dict]:
    """Words with their times and the indices of their tokens in the transcript."""
    out, at = [], 0
    for w in timings:
        idx = list(range(at, at + len(w.tokens)))
        at += len(w.tokens)
        if w.tokens and all(t < eot for t in w.tokens):
            out.append({"w": w.word.strip(), "s": round(float(w.start), 3), "e": round(float(w.end), 3), "t": idx})
    return out


def _token_times(words: list[dict], n: int, seconds: float) -> list[float]:
    """Each text token's time: the middle of its word; a token in no word takes the time of the token before it."""
    times: list[float | None] = [None] * n
    for w in words:
        for i in w["t"]:
            times[i] = round((w["s"] + w["e"]) / 2, 3)
    if all(t is None for t in times):  # no word times (no alignment heads): spread over the clip
        return [round(seconds * (i + 0.5) / max(n, 1), 3) for i in range(n)]
    known = next(t for t in times if t is not None)
    for i, t in enumerate(times):
        known = t if t is not None else known
        times[i] = known
    return times  # type: ignore[return-value]


def feature_data(
    model: Whisper,
    audio,
    *,
    name: str,
    sae=None,
    features=None,
    top_k: int = 8,
    batch_size: int = 8,
    progress: bool = False,
    title: str | None = None,
) -> dict:
    """The page's data for the features of ``name`` (see the module) over the clips in ``audio`` (folders/files).

    ``features``: the feature indices to show (default every one); ``top_k``: moments per feature.
    """
    from ..distributed import find_clips

    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    n_features, kind = feature_source(model, name, sae)[3:]  # bad names and features fail before any work
    chosen = list(range(n_features)) if features is None else [int(f) for f in features]
    bad = [f for f in chosen if not 0 <= f < n_features]
    if bad:
        raise IndexError(f"feature {bad[0]} is out of range: {name} has {n_features} {kind}s (0-{n_features - 1})")
    if not chosen:
        raise ValueError("no features chosen")
    clips = find_clips([audio] if isinstance(audio, str | os.PathLike) else audio, model)
    records, acts, _, _ = collect(model, clips, name, sae, batch_size=batch_size, progress=progress)
    return build(records, acts, chosen, name=name, kind=kind, top_k=top_k, title=title)


def build(records: list[dict], acts: list[np.ndarray], chosen: list[int], *, name: str, kind: str, top_k: int = 8,
          title: str | None = None) -> dict:  # fmt: skip
    """The page's data from ``collect``'s records and activations (``[positions, F]`` per clip)."""
    decoder = name.startswith("decoder.")
    cols = np.asarray(chosen, dtype=np.int64)
    peaks = np.stack([a[:, cols].max(0) if len(a) else np.zeros(len(cols)) for a in acts]).astype(np.float32)  # (C, F')
    where = np.stack([a[:, cols].argmax(0) if len(a) else np.zeros(len(cols), int) for a in acts])  # (C, F')
    everything = np.concatenate([a[:, cols] for a in acts]).astype(np.float32)  # (N, F')
    active = everything > 0
    density = active.mean(0)  # (F',)
    top = np.argsort(-peaks, axis=0, kind="stable")[:top_k]  # (k, F'): clips by their peak
    out = []
    for j, f in enumerate(chosen):
        col = everything[:, j]
        hi = float(col.max()) if len(col) else 0.0
        nz = col[col > 0]
        hist = np.histogram(nz, bins=BINS, range=(0.0, hi if hi > 0 else 1.0))[0].tolist()
        moments = []
        for c in top[:, j].tolist():
            if peaks[c, j] <= 0:
                break
            moments.append(_moment(records[c], acts[c][:, f], int(where[c, j]), c, decoder))
        words = " ".join(m["words"] for m in moments[:3])
        out.append({"id": int(f), "max": round(hi, 4), "density": round(float(density[j]), 5), "hist": hist,
                    "moments": moments, "about": words[:120]})  # fmt: skip
    clips = []
    for r in records:
        clips.append({"clip": r["clip"], "seconds": r["seconds"], "text": r["text"],
                      "audio": audio_data_uri(r["audio"]), "mel": encode_array(r["mel"], "u8")})  # fmt: skip
    return {
        "title": title or f"whisper-lens features: {name}",
        "name": name,
        "kind": kind,
        "stack": "decoder" if decoder else "encoder",
        "snippet": SNIPPET,
        "mel_seconds": MEL_SECONDS,
        "positions": sum(len(a) for a in acts),
        "clips": clips,
        "features": out,
    }


def _moment(record: dict, x: np.ndarray, peak: int, clip: int, decoder: bool) -> dict:
    """One top moment: the snippet's bounds, the activation over it as (time, value) points, its words."""
    x = x.astype(np.float32)
    if decoder:
        times = np.asarray(record["token_times"], dtype=np.float32)
        t = float(times[peak])
    else:
        times = (np.arange(len(x)) + 0.5) * POSITION_SECONDS
        t = float(times[peak])
    start = max(0.0, min(t - SNIPPET, record["seconds"] - 2 * SNIPPET))
    end = min(record["seconds"], start + 2 * SNIPPET)
    inside = (times >= start) & (times <= end)
    curve = [[round(float(a) - start, 3), round(float(v), 4)] for a, v in zip(times[inside], x[inside], strict=True)]
    said = [w for w in record["words"] if w["e"] > start and w["s"] < end]
    m = {"clip": clip, "t": round(t, 3), "start": round(start, 3), "end": round(end, 3),
         "value": round(float(x[peak]), 4), "curve": curve, "words": " ".join(w["w"] for w in said),
         "spoken": [[w["w"], round(w["s"] - start, 3), round(w["e"] - start, 3)] for w in said]}  # fmt: skip
    if decoder:
        toks = record["tokens"]
        m["token"] = toks[peak]
        m["context"] = [toks[max(0, peak - 6) : peak], toks[peak + 1 : peak + 4]]
    return m


def features_html(data: dict) -> str:
    """The page for ``feature_data``'s dict."""
    return page(data["title"], FEATURES_BODY, data=data, css=FEATURES_CSS, js=FEATURES_JS)


def write_features(model: Whisper, audio, out: str | os.PathLike, **options) -> Path:
    """Write the feature page of ``audio``'s clips to ``out`` (an .html file; its folder must exist)."""
    check_page_path(out)  # before the work
    return write_page(out, features_html(feature_data(model, audio, **options)))


FEATURES_BODY = """
<h1 id="title"></h1>
<div class="note" id="meta"></div>
<div id="main">
 <div id="side">
  <input id="search" type="search" placeholder="filter: feature number or a word spoken">
  <select id="sort"><option value="max">sort by max</option><option value="density">by density</option>
   <option value="id">by number</option></select>
  <div class="note" id="count"></div>
  <div id="list"></div>
 </div>
 <div id="detail"><p class="note">Choose a feature on the left.</p></div>
</div>
"""

FEATURES_CSS = """
#main{display:flex;gap:16px;align-items:flex-start}
#side{width:300px;flex:none} #search{width:100%;box-sizing:border-box;margin-bottom:4px}
#list{height:80vh;overflow:auto;border:1px solid #ddd}
#list div{padding:2px 6px;cursor:pointer;border-bottom:1px solid #eee;font-size:12px;white-space:nowrap;
 overflow:hidden;text-overflow:ellipsis}
#list div.sel{background:#3b528b;color:#fff} #list div:hover{background:#eef}
#detail{flex:1;min-width:0}
.moment{display:flex;gap:12px;align-items:center;margin:8px 0;border-top:1px solid #eee;padding-top:6px}
.moment canvas{border:1px solid #ccc}
.moment .said{font-size:13px} .moment .tok{background:#fde725;padding:0 2px;font-family:ui-monospace,monospace}
"""

FEATURES_JS = r"""
const D = WL_DATA, $ = id => document.getElementById(id);
const features = window.features = {ready: false, data: D, shown: [], opened: null, mels: {}, sounds: {}};

// A snippet of a clip as a WAV blob URL: the clip's Opus decoded once (Web Audio), cut, written as 16-bit PCM.
async function clipSamples(c) {
  if (!features.sounds[c]) {
    const buf = await (await fetch(D.clips[c].audio)).arrayBuffer();
    const ctx = new OfflineAudioContext(1, 1, 16000);
    features.sounds[c] = await ctx.decodeAudioData(buf);
  }
  return features.sounds[c];
}
function wav(samples, rate) {
  const n = samples.length, b = new DataView(new ArrayBuffer(44 + 2 * n));
  const put = (o, s) => { for (let i = 0; i < s.length; i++) b.setUint8(o + i, s.charCodeAt(i)); };
  put(0, 'RIFF'); b.setUint32(4, 36 + 2 * n, true); put(8, 'WAVEfmt '); b.setUint32(16, 16, true);
  b.setUint16(20, 1, true); b.setUint16(22, 1, true); b.setUint32(24, rate, true); b.setUint32(28, 2 * rate, true);
  b.setUint16(32, 2, true); b.setUint16(34, 16, true); put(36, 'data'); b.setUint32(40, 2 * n, true);
  for (let i = 0; i < n; i++) b.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, samples[i])) * 32767, true);
  return URL.createObjectURL(new Blob([b], {type: 'audio/wav'}));
}
async function snippetURL(m) {
  const s = await clipSamples(m.clip), rate = s.sampleRate, data = s.getChannelData(0);
  const a = Math.round(m.start * rate), n = Math.round((m.end - m.start) * rate);
  const out = new Float32Array(n);
  out.set(data.subarray(a, Math.min(data.length, a + n)));
  return wav(out, rate);
}
async function mel(c) {
  if (!features.mels[c]) features.mels[c] = await wlDecode(D.clips[c].mel);
  return features.mels[c];
}

// The snippet's spectrogram with the activation drawn over it (white curve; the peak's time marked).
async function drawMoment(canvas, m, top) {
  const g = canvas.getContext('2d'), W = canvas.width, H = canvas.height;
  const spec = await mel(m.clip), [nm, nf] = spec.shape;
  const f0 = Math.round(m.start / D.mel_seconds), f1 = Math.min(nf, Math.round(m.end / D.mel_seconds));
  let lo = Infinity, hi = -Infinity;
  for (let i = 0; i < spec.data.length; i++) { lo = Math.min(lo, spec.data[i]); hi = Math.max(hi, spec.data[i]); }
  const img = g.createImageData(W, H);
  for (let x = 0; x < W; x++) {
    const f = Math.min(nf - 1, f0 + Math.floor(x * (f1 - f0) / W));
    for (let y = 0; y < H; y++) {
      const k = Math.min(nm - 1, Math.floor((H - 1 - y) * nm / H));
      const [r, gg, b] = wlColour((spec.data[k * nf + f] - lo) / (hi - lo || 1));
      const o = 4 * (y * W + x);
      img.data[o] = r; img.data[o + 1] = gg; img.data[o + 2] = b; img.data[o + 3] = 255;
    }
  }
  g.putImageData(img, 0, 0);
  const dur = m.end - m.start, X = t => t / dur * W, Y = v => H - 4 - (H - 8) * v / (top || 1);
  g.strokeStyle = '#ff4040'; g.beginPath(); g.moveTo(X(m.t - m.start), 0); g.lineTo(X(m.t - m.start), H); g.stroke();
  g.strokeStyle = '#fff'; g.lineWidth = 2; g.beginPath();
  m.curve.forEach(([t, v], i) => i ? g.lineTo(X(t), Y(v)) : g.moveTo(X(t), Y(v)));
  if (m.curve.length === 1) { g.arc(X(m.curve[0][0]), Y(m.curve[0][1]), 3, 0, 7); }
  g.stroke();
}

function drawHistogram(canvas, f) {
  const g = canvas.getContext('2d'), W = canvas.width, H = canvas.height, top = Math.max(1, ...f.hist);
  g.fillStyle = '#fff'; g.fillRect(0, 0, W, H);
  g.fillStyle = '#3b528b';
  const w = W / f.hist.length;
  f.hist.forEach((c, i) => { const h = c ? Math.max(1, (H - 12) * Math.log1p(c) / Math.log1p(top)) : 0;
                             g.fillRect(i * w + 1, H - 12 - h, w - 2, h); });
  g.fillStyle = '#444'; g.font = '10px sans-serif';
  g.fillText('0', 0, H - 1); g.fillText(f.max.toFixed(2), W - 30, H - 1);
}

async function open(i) {
  const f = D.features[i];
  features.opened = i;
  document.querySelectorAll('#list div').forEach(e => e.classList.toggle('sel', +e.dataset.i === i));
  const det = $('detail');
  det.innerHTML = `<h2>${D.kind} ${f.id} <span class="note">max ${f.max.toFixed(3)}, active at
    ${(100 * f.density).toFixed(2)} % of ${D.positions} positions</span></h2>
    <canvas id="hist" width="360" height="90"></canvas><div class="note">histogram of the non-zero activations
    (log counts)</div><div id="moments"></div>`;
  drawHistogram($('hist'), f);
  const box = $('moments');
  if (!f.moments.length) box.innerHTML = '<p class="note">never active on these clips</p>';
  for (const [j, m] of f.moments.entries()) {
    const c = D.clips[m.clip], div = document.createElement('div');
    div.className = 'moment';
    const said = m.token === undefined ? wlEscape(m.words || '(no words)')
      : `${wlEscape(m.context[0].join(''))}<span class="tok">${wlEscape(m.token)}</span>` +
        `${wlEscape(m.context[1].join(''))} <span class="note">(${wlEscape(m.words)})</span>`;
    div.innerHTML = `<canvas width="300" height="90"></canvas><div><div><b>${m.value.toFixed(3)}</b>
      ${wlEscape(c.clip)} at ${m.t.toFixed(2)} s</div><audio controls preload="auto"></audio>
      <div class="said">${said}</div></div>`;
    box.appendChild(div);
    drawMoment(div.querySelector('canvas'), m, f.max);
    div.querySelector('audio').src = await snippetURL(m);
  }
  return f;
}

function filter(text) {
  const q = text.trim().toLowerCase(), key = $('sort').value;
  const order = D.features.map((f, i) => i).filter(i => {
    const f = D.features[i];
    return !q || String(f.id) === q || f.about.toLowerCase().includes(q) ||
           f.moments.some(m => (m.words || '').toLowerCase().includes(q) || (m.token || '').toLowerCase().includes(q));
  });
  order.sort((a, b) => key === 'id' ? D.features[a].id - D.features[b].id : D.features[b][key] - D.features[a][key]);
  features.shown = order;
  const list = $('list');
  list.innerHTML = order.map(i => { const f = D.features[i];
    return `<div data-i="${i}" title="${wlEscape(f.about)}">${f.id} · ${f.max.toFixed(2)} · ` +
           `${(100 * f.density).toFixed(1)}% · ${wlEscape(f.about)}</div>`; }).join('');
  $('count').textContent = `${order.length} of ${D.features.length} ${D.kind}s`;
  return order.length;
}

$('title').textContent = D.title;
$('meta').textContent = `${D.features.length} ${D.kind}s of ${D.name} over ${D.clips.length} clips ` +
  `(${D.stack} positions); each moment: +-${D.snippet} s around the peak, activation drawn over the spectrogram`;
$('list').addEventListener('click', e => { const d = e.target.closest('div[data-i]'); if (d) open(+d.dataset.i); });
$('search').addEventListener('input', e => filter(e.target.value));
$('sort').addEventListener('change', () => filter($('search').value));
features.open = open;
features.filter = t => { $('search').value = t; return filter(t); };
filter('');
features.readyAt = performance.now();  // ms from navigation to a usable page
features.ready = true;
"""
