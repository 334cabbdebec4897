"""The clip explorer: one clip as a self-contained HTML page, for seeing where each word listened.

``explorer_data(model, audio)`` decodes the clip greedily, times its words on the alignment heads
(``alignment.align``), runs the model once more teacher-forced with a full trace of the decoder's
attention and lens streams, and gathers everything the page draws:

- the log-mel spectrogram (a PNG) with the audio (Opus, ~3 kB/s) and a cursor that follows playback;
- the transcript as tokens (partial UTF-8 bytes merged), with word timestamps;
- per token, the cross-attention of every decoder layer over the audio, each head and their mean
  (the alignment heads marked), at the position that *predicts* the token (the row word timing reads);
- per token, the logit lens: each layer's top predictions with their probabilities;
- the encoder lens: each token's probability when only the first k encoder blocks run, drawn at the
  token's time;
- a head grid of any decoder layer (self- or cross-attention) that opens a head's full pattern.

``explorer_html`` wraps the data in ``EXPLORER_JS``/``EXPLORER_CSS`` (``pages.common.page``); the page
exposes ``window.explorer`` (``ready``, ``data``, ``select(i)``, ``view()``) so a test can read back
what it draws. Attention and probabilities are 16-bit quantised (error <= 7.6e-6 on [0, 1]) and
zlib-compressed. ``show(model, audio)`` gives the page inline in Jupyter.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..audio import HOP_LENGTH, SAMPLE_RATE, load_audio, load_windows
from ..model import Whisper
from .common import Inline, audio_data_uri, check_page_path, encode_array, image_data_uri, page, write_page

TOP_K = 5  # logit-lens predictions kept per layer and token
AFTER_AUDIO = 25  # encoder positions (0.5 s) shown after the audio ends
POSITION_SECONDS = 2 * HOP_LENGTH / SAMPLE_RATE  # 0.02 s: one encoder position


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text, for a sequence of tokens read in order. A character cut across tokens (partial
    UTF-8 bytes) is written whole on its first token and as '…' on the rest; a piece that completes no
    character is written as its bytes (``<e6 9d>``). Specials are named briefly (``study.token_label``)."""
    from ..study import token_label

    out, i = [], 0
    while i < len(ids):
        text = token_label(tokenizer, ids[i])
        j = i + 1
        if "\ufffd" in text and ids[i] < tokenizer.eot:
            while j < min(len(ids), i + 4) and "\ufffd" in tokenizer.decode(ids[i:j]) and ids[j] < tokenizer.eot:
                j += 1
            whole = tokenizer.decode(ids[i:j])
            text, j = (whole, j) if "\ufffd" not in whole else (_bytes(tokenizer, ids[i]), i + 1)
        out += [text] + ["\u2026"] * (j - i - 1)
        i = j
    return out


def _bytes(tokenizer, token: int) -> str:
    """A token that is part of a character, as its bytes: '<e6 9d>' (U+FFFD where they cannot be read)."""
    try:
        raw = tokenizer._encoding.decode_single_token_bytes(token)
    except (AttributeError, KeyError):
        return tokenizer.decode([token])
    return "<" + " ".join(f"{b:02x}" for b in raw) + ">"


@torch.no_grad()
def explorer_data(
    model: Whisper, audio, *, name: str | None = None, top_k: int = TOP_K, progress: bool = False
) -> dict:
    """Everything the explorer page shows for one clip (a path or a 16 kHz array no longer than the window).

    ``progress``: a bar over the four passes (decode, trace, word times, encoder lens) on stderr.
    """
    from tqdm import tqdm

    from ..alignment import align
    from ..lens import decoder_lens_from_trace, encoder_lens, lens_names
    from ..study import prompt_tokens

    tok = model.tokenizer
    if tok is None:
        raise ValueError("the explorer needs a tokenizer: load_model(..., tokenizer=path)")
    if isinstance(audio, str | os.PathLike):
        name = name or Path(audio).name
        audio = load_audio(audio)
    samples = np.asarray(audio.detach().cpu() if hasattr(audio, "detach") else audio, dtype=np.float32)
    d = model.dims
    mels, (seconds,) = load_windows([samples], d.n_mels, 2 * d.n_audio_ctx)  # (1, n_mels, frames)
    if seconds <= 0:
        raise ValueError("the clip is empty: nothing to explore")
    mel = mels.to(model.device, model.dtype)
    bar = tqdm(total=4, desc="explore", unit="pass", disable=not progress, postfix="decode")
    res = model.generate(mel)[0]
    bar.update()
    bar.set_postfix_str("trace")
    text = [t for t in res.tokens if t < tok.eot]
    prompt = prompt_tokens(model, res.language)
    seq = prompt + text  # fed positions; row len(prompt) - 1 + i predicts text[i], the last row predicts EOT
    shown = min(d.n_audio_ctx, int(np.ceil(seconds / POSITION_SECONDS)) + AFTER_AUDIO)  # positions drawn
    names = ["decoder.blocks.*.cross_attn.pattern", "decoder.blocks.*.attn.pattern", *lens_names(model)]
    run = model.run(mel, torch.tensor([seq]), trace=names)
    first = len(prompt) - 1  # the row predicting the first text token
    L = d.n_text_layer
    cross = torch.stack([run.trace[f"decoder.blocks.{i}.cross_attn.pattern"][0] for i in range(L)])  # (L,H,T,S)
    cross = cross[:, :, first:].float()  # (L, H, R, S): R = len(text) + 1 rows, the last predicting EOT
    self_attn = torch.stack([run.trace[f"decoder.blocks.{i}.attn.pattern"][0] for i in range(L)]).float()  # (L,H,T,T)
    lens = decoder_lens_from_trace(model, run.trace, k=top_k)
    bar.update()
    bar.set_postfix_str("encoder lens")
    shown_ids = text + [tok.eot]
    lens_ids = lens.top_ids[:, 0, first:].cpu()  # (L+1, R, k)
    lens_probs = lens.top_probs[:, 0, first:].float().cpu()  # (L+1, R, k)
    # p(shown token) per layer: the lens of the token actually written (its own column in the readouts)
    enc = encoder_lens(model, mel, torch.tensor([seq + [tok.eot]]))[:, 0, first:].float().cpu()  # (L_enc+1, R)
    final_prob = _token_probs(model, run.trace, first, shown_ids)  # (L+1, R): p(shown token) per layer
    bar.update()
    bar.set_postfix_str("word times")
    words = _words(model, mel, text, prompt[:-1], seconds, align) if text else []  # prompt less <|notimestamps|>
    bar.update()
    bar.close()
    vocab_ids = sorted(set(lens_ids.flatten().tolist()) | set(seq) | set(shown_ids))
    labels = {t: token_texts(tok, [t])[0] for t in vocab_ids}  # each id alone: the lens' candidates
    shown_texts = token_texts(tok, shown_ids)
    fed_texts = token_texts(tok, seq)
    heads = sorted({(int(a), int(b)) for a, b in (model.alignment_heads or [])})
    data = {
        "clip": name or "audio",
        "text": res.text.strip(),
        "seconds": seconds,
        "positions": shown,
        "position_seconds": POSITION_SECONDS,
        "dims": {
            "n_text_layer": L,
            "n_text_head": d.n_text_head,
            "n_audio_layer": d.n_audio_layer,
            "n_audio_ctx": d.n_audio_ctx,
        },
        "tokens": [{"id": t, "text": s, "row": i} for i, (t, s) in enumerate(zip(shown_ids, shown_texts, strict=True))],
        "fed": fed_texts,
        "fed_ids": seq,
        "first_row": first,
        "words": words,
        "alignment_heads": [list(h) for h in heads],
        "layer_labels": lens.labels,
        "encoder_labels": [str(k) for k in range(d.n_audio_layer + 1)],
        "vocab": {str(k): v for k, v in labels.items()},
        "lens_ids": lens_ids.tolist(),
        "arrays": {
            "cross": encode_array(cross[..., :shown]),  # (L, H, R, P)
            "cross_after": encode_array(cross[..., shown:].sum(-1)),  # (L, H, R): the mass after the drawn part
            "self": encode_array(self_attn),  # (L, H, T, T)
            "lens_probs": encode_array(lens_probs),  # (L+1, R, k)
            "final_prob": encode_array(final_prob),  # (L+1, R)
            "encoder_lens": encode_array(enc),  # (L_enc+1, R)
        },
        "mel_png": image_data_uri(mels[0, :, : 2 * shown].float(), cmap="magma"),
        "audio": audio_data_uri(samples),
    }
    return data


def _token_probs(model: Whisper, trace, first: int, ids: list[int]) -> torch.Tensor:
    """(L+1, R): the probability each lens readout gives token ``ids[r]`` at row ``first + r`` (one layer at a time)."""
    from ..lens import lens_names, readout

    rows = torch.arange(len(ids))
    out = []
    for name in lens_names(model):
        logp = readout(model, trace[name][0, first:].to(model.device, model.dtype)).log_softmax(-1).cpu()  # (R, V)
        out.append(logp[rows, torch.tensor(ids)].exp())  # (R,)
    return torch.stack(out)  # (L+1, R)


def _words(model: Whisper, mel: torch.Tensor, text: list[int], sot: list[int], seconds: float, align) -> list[dict]:
    """Word timings (alignment heads + DTW) with the indices of each word's tokens; [] without alignment heads."""
    heads = model.alignment_heads
    if not heads:
        return []
    tok = model.tokenizer
    xa = model.encoder(mel)  # (1, S, D)
    frames = int(round(seconds * SAMPLE_RATE / HOP_LENGTH))
    timing = align(model, xa, [text], [frames], [tuple(h) for h in heads], sot)[0]
    out, at = [], 0
    for w in timing.words:
        idx = list(range(at, at + len(w.tokens)))
        at += len(w.tokens)
        if w.tokens and all(t < tok.eot for t in w.tokens):
            out.append({"word": w.word, "start": round(float(w.start), 3), "end": round(float(w.end), 3),
                        "probability": round(float(w.probability), 4), "tokens": idx})  # fmt: skip
    return out


def explorer_html(data: dict, title: str | None = None) -> str:
    """The page for ``explorer_data``'s dict."""
    title = title or f"whisper-lens explorer: {data['clip']}"
    return page(title, EXPLORER_BODY, data=data, css=EXPLORER_CSS, js=EXPLORER_JS)


def write_explorer(model: Whisper, audio, out: str | os.PathLike, *, name: str | None = None,
                   progress: bool = False) -> Path:  # fmt: skip
    """Write the explorer page of one clip to ``out`` (an .html file; its folder must exist)."""
    check_page_path(out)  # before the work
    return write_page(out, explorer_html(explorer_data(model, audio, name=name, progress=progress)))


def show(model: Whisper, audio, *, name: str | None = None, height: int = 900) -> Inline:
    """The explorer of one clip inline in a notebook (an iframe; ``.save(path)`` writes the page)."""
    return Inline(explorer_html(explorer_data(model, audio, name=name)), height=height)


EXPLORER_BODY = """
<h1 id="title"></h1>
<div class="note" id="meta"></div>
<div id="player"><audio id="audio" controls preload="auto"></audio>
 <span class="note">Click the spectrogram to jump; click a token to see where it listened.
 <span id="overlaynote"></span></span></div>
<div id="timeline">
 <div id="specbox"><img id="spec" alt="log-mel spectrogram"><canvas id="overlay"></canvas><div id="cursor"></div></div>
 <div id="wordrow"></div>
 <canvas id="axis" height="18"></canvas>
</div>
<h2>Transcript <span class="note">(tokens; hover for word times)</span></h2>
<div id="transcript"></div>
<h2>Cross-attention of <span id="selname"></span> <span class="note" id="crossnote"></span></h2>
<canvas id="cross"></canvas>
<div class="cols">
 <div><h2>Logit lens <span class="note">(each decoder layer's top predictions at the position predicting
  this token)</span></h2><div id="lens"></div></div>
 <div><h2>Encoder lens <span class="note">(p(token) with only the first k encoder blocks, drawn at each
  word's time)</span></h2><canvas id="enclens"></canvas><div id="enctable"></div></div>
</div>
<h2>Head grid <select id="gridkind"><option value="cross">cross-attention</option>
 <option value="self">self-attention</option></select> layer <select id="gridlayer"></select>
 <span class="note">(click a head to open its full pattern)</span></h2>
<div id="grid"></div>
<div id="full"></div>
"""

EXPLORER_CSS = """
#timeline{position:relative;margin:8px 0 0 90px}
#specbox{position:relative;height:160px}
#spec{position:absolute;left:0;top:0;width:100%;height:160px;cursor:pointer}
#overlay{position:absolute;left:0;top:0;width:100%;height:160px;pointer-events:none}
#cursor{position:absolute;top:0;width:2px;height:160px;background:#0ff;left:0;pointer-events:none}
#wordrow{position:relative;height:34px;font-size:11px}
#wordrow span{position:absolute;top:2px;border-left:1px solid #888;padding-left:2px;white-space:nowrap;overflow:hidden}
#wordrow span.sel{background:#ffe08a}
#axis{width:100%;display:block}
#transcript{line-height:2.1;max-width:1300px}
#transcript .tok{border:1px solid #ccc;border-radius:3px;padding:1px 3px;margin:1px;cursor:pointer;
 white-space:pre;font-family:ui-monospace,monospace;font-size:12px}
#transcript .tok.sel{background:#3b528b;color:#fff}
#cross{display:block;margin-top:4px}
.cols{display:flex;gap:24px;flex-wrap:wrap}
#lens td.final{background:#fde725} #lens td{font-family:ui-monospace,monospace;white-space:pre}
#grid{display:flex;flex-wrap:wrap;gap:6px}
#grid figure{margin:0;text-align:center;font-size:11px;cursor:pointer}
#grid canvas{border:1px solid #ccc;width:130px;height:130px}
#full canvas{border:1px solid #ccc;margin-top:8px;max-width:100%}
"""

EXPLORER_JS = r"""
const D = WL_DATA, A = {};
const LABEL_W = 90;  // px left of the timeline: row labels of the attention strips
const $ = id => document.getElementById(id);
const explorer = window.explorer = {ready: false, data: D, arrays: A, selected: null, drawn: null};

function isAlignment(l, h) { return D.alignment_heads.some(p => p[0] === l && p[1] === h); }
function timelineWidth() { return $('timeline').clientWidth; }
function shownSeconds() { return D.positions * D.position_seconds; }

function setup() {
  $('title').textContent = 'whisper-lens explorer: ' + D.clip;
  $('meta').textContent = `${D.seconds.toFixed(2)} s of audio, ${shownSeconds().toFixed(2)} s drawn; ` +
    `${D.dims.n_text_layer} decoder layers x ${D.dims.n_text_head} heads; transcript: ${D.text}`;
  $('spec').src = D.mel_png;
  $('audio').src = D.audio;
  const row = $('wordrow'), W = timelineWidth(), T = shownSeconds();
  D.words.forEach((w, i) => {
    const s = document.createElement('span');
    s.textContent = w.word.trim();
    s.title = `${w.word.trim()}: ${w.start.toFixed(2)}-${w.end.toFixed(2)} s (p ${w.probability.toFixed(2)})`;
    s.style.left = (w.start / T * 100) + '%';
    s.style.width = Math.max(0.5, (w.end - w.start) / T * 100) + '%';
    s.style.top = (i % 2 ? 17 : 2) + 'px';
    s.dataset.word = i;
    row.appendChild(s);
  });
  const wordOf = {};
  D.words.forEach((w, i) => w.tokens.forEach(t => { wordOf[t] = i; }));
  const tr = $('transcript');
  D.tokens.forEach((t, i) => {
    const s = document.createElement('span');
    s.className = 'tok';
    s.textContent = t.text;
    s.dataset.token = i;
    const w = D.words[wordOf[i]];
    s.title = w ? `${w.word.trim()}: ${w.start.toFixed(2)}-${w.end.toFixed(2)} s` : '(no word time)';
    s.addEventListener('click', () => select(i));
    tr.appendChild(s);
  });
  drawAxis();
  const layerSel = $('gridlayer');
  for (let l = 0; l < D.dims.n_text_layer; l++) layerSel.add(new Option(String(l), String(l)));
  layerSel.addEventListener('change', drawGrid);
  $('gridkind').addEventListener('change', drawGrid);
  $('spec').addEventListener('click', e => {
    const r = $('spec').getBoundingClientRect();
    $('audio').currentTime = Math.min(D.seconds, (e.clientX - r.left) / r.width * shownSeconds());
    moveCursor();
  });
  const audio = $('audio');
  const tick = () => { moveCursor(); if (!audio.paused) requestAnimationFrame(tick); };
  audio.addEventListener('play', () => requestAnimationFrame(tick));
  audio.addEventListener('timeupdate', moveCursor);
  audio.addEventListener('seeked', moveCursor);
}

function moveCursor() {
  $('cursor').style.left = ($('audio').currentTime / shownSeconds() * 100) + '%';
}

function drawAxis() {
  const c = $('axis'), W = timelineWidth(), T = shownSeconds();
  c.width = W;
  const g = c.getContext('2d');
  g.font = '11px sans-serif'; g.fillStyle = '#333';
  const step = [0.1, 0.2, 0.5, 1, 2, 5].find(s => T / s <= W / 50) || 10;
  for (let t = 0; t <= T + 1e-9; t += step) {
    const x = t / T * W;
    g.fillRect(x, 0, 1, 4);
    const label = (step < 1 ? t.toFixed(1) : t.toFixed(0)) + (t === 0 ? ' s' : '');
    g.fillText(label, Math.min(W - g.measureText(label).width, Math.max(0, x - 8)), 15);
  }
}

// The token's cross-attention rows: cross[l][h] over the drawn positions, and each layer's mean.
function crossRows(i) {
  const [L, H, R, P] = A.cross.shape, rows = [];
  for (let l = 0; l < L; l++) {
    const heads = [];
    const mean = new Float32Array(P);
    for (let h = 0; h < H; h++) {
      const off = ((l * H + h) * R + i) * P;
      const r = A.cross.data.slice(off, off + P);
      heads.push(r);
      for (let p = 0; p < P; p++) mean[p] += r[p] / H;
    }
    rows.push({heads, mean});
  }
  return rows;
}

function select(i) {
  explorer.selected = i;
  document.querySelectorAll('#transcript .tok').forEach(s => s.classList.toggle('sel', +s.dataset.token === i));
  document.querySelectorAll('#wordrow span').forEach(s =>
    s.classList.toggle('sel', D.words[+s.dataset.word].tokens.includes(i)));
  const t = D.tokens[i];
  $('selname').textContent = JSON.stringify(t.text);
  const rows = crossRows(i);
  explorer.drawn = {token: i, rows};
  drawCross(i, rows);
  drawOverlay(rows);
  drawLens(i);
  drawEncoderLens(i);
}

// One strip per head and one for the mean of each layer, on the spectrogram's time axis; one colour scale.
function drawCross(i, rows) {
  const [L, H, R, P] = A.cross.shape, W = timelineWidth(), rowH = 9, gap = 6;
  let vmax = 1e-9;
  rows.forEach(r => r.heads.forEach(h => h.forEach(v => { vmax = Math.max(vmax, v); })));
  const c = $('cross');
  c.width = LABEL_W + W; c.height = L * ((H + 1) * rowH + gap) + 20;
  const g = c.getContext('2d');
  g.fillStyle = '#fff'; g.fillRect(0, 0, c.width, c.height);
  g.font = '10px sans-serif';
  let y = 0;
  rows.forEach((r, l) => {
    const strips = [...r.heads.map((h, k) => [`L${l} h${k}` + (isAlignment(l, k) ? ' \u2605' : ''), h]),
                    [`L${l} mean`, r.mean]];
    strips.forEach(([label, v]) => {
      g.fillStyle = label.includes('\u2605') ? '#b8860b' : '#333';
      g.fillText(label, 2, y + rowH - 1);
      const img = g.createImageData(W, rowH);
      for (let x = 0; x < W; x++) {
        const p0 = Math.floor(x / W * P), p1 = Math.max(p0 + 1, Math.floor((x + 1) / W * P));
        let m = 0;
        for (let p = p0; p < p1; p++) m = Math.max(m, v[p]);  // block maximum: a one-position peak stays
        const col = wlColour(m / vmax);
        for (let yy = 0; yy < rowH - 1; yy++) {
          const o = (yy * W + x) * 4;
          img.data[o] = col[0]; img.data[o + 1] = col[1]; img.data[o + 2] = col[2]; img.data[o + 3] = 255;
        }
      }
      g.putImageData(img, LABEL_W, y);
      y += rowH;
    });
    y += gap;
  });
  g.fillStyle = '#333';
  g.fillText(`colour: 0 (dark) to ${vmax.toPrecision(3)} (yellow), the largest weight of this token's heads; ` +
             '\u2605 alignment head', LABEL_W, y + 12);
  const after = [];
  for (let l = 0; l < L; l++) {
    let s = 0;
    for (let h = 0; h < H; h++) s += A.cross_after.data[(l * H + h) * R + i] / H;
    after.push(s.toFixed(3));
  }
  $('crossnote').textContent = `(the row predicting it; mean mass after the drawn ${shownSeconds().toFixed(1)} s ` +
    `per layer: ${after.join(', ')})`;
}

// Over the spectrogram, a white line: the token's cross-attention, mean over the alignment heads (the
// heads word timing reads; without them, the last layer's mean), scaled to its own maximum.
function drawOverlay(rows) {
  const c = $('overlay'), W = timelineWidth(), Hh = 160;
  c.width = W; c.height = Hh;
  const g = c.getContext('2d');
  g.clearRect(0, 0, W, Hh);
  const P = rows[0].mean.length, v = new Float32Array(P);
  const heads = D.alignment_heads.length ? D.alignment_heads : null;
  if (heads) heads.forEach(([l, h]) => rows[l].heads[h].forEach((x, p) => { v[p] += x / heads.length; }));
  else rows[rows.length - 1].mean.forEach((x, p) => { v[p] = x; });
  let m = 1e-9; v.forEach(x => { m = Math.max(m, x); });
  g.strokeStyle = 'rgba(255,255,255,0.9)'; g.lineWidth = 1.5; g.beginPath();
  for (let p = 0; p < P; p++) {
    const x = (p + 0.5) / P * W, y = Hh - 4 - v[p] / m * (Hh - 10);
    p ? g.lineTo(x, y) : g.moveTo(x, y);
  }
  g.stroke();
  $('overlaynote').textContent = 'White line: the selected token\'s cross-attention, mean over ' +
    (heads ? `the ${heads.length} alignment heads (\u2605)` : 'the last layer\'s heads') + ', scaled to its peak.';
}

function drawLens(i) {
  const [L1, R, K] = A.lens_probs.shape, id = D.tokens[i].id;
  let html = '<table><tr><th>layer</th><th>p(token)</th>' +
             Array.from({length: K}, (_, k) => `<th>top ${k + 1}</th>`).join('') + '</tr>';
  for (let l = L1 - 1; l >= 0; l--) {
    html += `<tr><td>${wlEscape(D.layer_labels[l])}</td><td>${A.final_prob.data[l * R + i].toPrecision(3)}</td>`;
    for (let k = 0; k < K; k++) {
      const t = D.lens_ids[l][i][k], p = A.lens_probs.data[(l * R + i) * K + k];
      html += `<td class="${t === id ? 'final' : ''}">${wlEscape(JSON.stringify(D.vocab[t]))} ${p.toFixed(3)}</td>`;
    }
    html += '</tr>';
  }
  $('lens').innerHTML = html + '</table>';
}

// Every token's encoder-lens probability at its word's time (a word's tokens share its span equally).
function drawEncoderLens(sel) {
  const [K1, R] = A.encoder_lens.shape, W = timelineWidth(), T = shownSeconds(), rowH = 14;
  const c = $('enclens');
  c.width = LABEL_W + W; c.height = K1 * rowH + 4;
  const g = c.getContext('2d');
  g.fillStyle = '#fff'; g.fillRect(0, 0, c.width, c.height);
  g.font = '10px sans-serif';
  for (let k = 0; k < K1; k++) {
    const y = (K1 - 1 - k) * rowH;
    g.fillStyle = '#333'; g.fillText(`${D.encoder_labels[k]} block${k === 1 ? '' : 's'}`, 2, y + rowH - 3);
    D.words.forEach(w => w.tokens.forEach((t, j) => {
      const span = (w.end - w.start) / w.tokens.length, x0 = (w.start + j * span) / T * W;
      const col = wlColour(A.encoder_lens.data[k * R + t]);
      g.fillStyle = `rgb(${col})`;
      g.fillRect(LABEL_W + x0, y, Math.max(1, span / T * W - 1), rowH - 1);
      if (t === sel) { g.strokeStyle = '#f00'; g.strokeRect(LABEL_W + x0, y, Math.max(1, span / T * W - 1), rowH - 1); }
    }));
  }
  let html = '<table><tr><th>encoder blocks run</th><th>p(' + wlEscape(JSON.stringify(D.tokens[sel].text)) +
             ')</th></tr>';
  for (let k = K1 - 1; k >= 0; k--) html += `<tr><td>${D.encoder_labels[k]}</td>` +
    `<td>${A.encoder_lens.data[k * R + sel].toPrecision(3)}</td></tr>`;
  $('enctable').innerHTML = html + '</table><div class="note">colour: p from 0 (dark) to 1 (yellow)</div>';
}

// A head's pattern as an image on a canvas: rows x cols from a flat array, scaled to its own maximum.
function paintPattern(c, arr, rows, cols, off) {
  c.width = cols; c.height = rows;
  const g = c.getContext('2d'), img = g.createImageData(cols, rows);
  let m = 1e-9;
  for (let k = 0; k < rows * cols; k++) m = Math.max(m, arr[off + k]);
  for (let k = 0; k < rows * cols; k++) {
    const col = wlColour(arr[off + k] / m);
    img.data.set([col[0], col[1], col[2], 255], k * 4);
  }
  g.putImageData(img, 0, 0);
  return m;
}

function patternOf(kind, l, h) {
  if (kind === 'cross') {
    const [L, H, R, P] = A.cross.shape;
    return {arr: A.cross.data, rows: R, cols: P, off: (l * H + h) * R * P};
  }
  const [L, H, T] = A.self.shape;
  return {arr: A.self.data, rows: T, cols: T, off: (l * H + h) * T * T};
}

function drawGrid() {
  const kind = $('gridkind').value, l = +$('gridlayer').value, grid = $('grid');
  grid.innerHTML = ''; $('full').innerHTML = '';
  for (let h = 0; h < D.dims.n_text_head; h++) {
    const f = document.createElement('figure'), c = document.createElement('canvas');
    const p = patternOf(kind, l, h);
    paintPattern(c, p.arr, p.rows, p.cols, p.off);
    const cap = document.createElement('figcaption');
    cap.textContent = `head ${h}` + (kind === 'cross' && isAlignment(l, h) ? ' \u2605' : '');
    f.append(c, cap);
    f.addEventListener('click', () => openFull(kind, l, h));
    grid.appendChild(f);
  }
}

function openFull(kind, l, h) {
  const p = patternOf(kind, l, h), c = document.createElement('canvas');
  const m = paintPattern(c, p.arr, p.rows, p.cols, p.off);
  const scale = Math.max(1, Math.min(12, Math.floor(1200 / p.cols)));
  c.style.width = (p.cols * scale) + 'px'; c.style.height = (p.rows * Math.max(scale, kind === 'cross' ? 6 : 1)) + 'px';
  const fed = D.fed.map(s => JSON.stringify(s)).join(' ');
  const what = kind === 'cross' ? `rows: tokens (the row predicting each), audio 0-${shownSeconds().toFixed(1)} s`
                                : `rows and columns: the fed tokens (${fed})`;
  $('full').innerHTML = `<h2>decoder.blocks.${l}.${kind === 'cross' ? 'cross_attn' : 'attn'}.pattern, head ${h}</h2>` +
    `<div class="note">${wlEscape(what)}; colour 0 to ${m.toPrecision(3)}</div>`;
  $('full').appendChild(c);
  explorer.full = {kind, layer: l, head: h};
}

explorer.select = select;
explorer.openFull = openFull;
explorer.view = () => explorer.drawn && {token: explorer.selected,
  heads: explorer.drawn.rows.map(r => r.heads.map(h => Array.from(h))),
  mean: explorer.drawn.rows.map(r => Array.from(r.mean))};

(async () => {
  for (const [k, spec] of Object.entries(D.arrays)) A[k] = await wlDecode(spec);
  setup();
  drawGrid();
  select(0);
  explorer.ready = true;
})();
"""
