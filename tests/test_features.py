"""Feature pages on real tiny.en: the numbers are the model's, and the page works in headless Chromium.

A tiny top-k SAE (a few steps on three clips) gives the latents; decoder neurons give a page of token
positions. The browser test loads each page from disk, filters the list, opens a feature, plays a
snippet and checks that the spectrogram, the activation curve and the histogram are drawn.
"""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest
import torch

from whisper_lens.audio import load_windows
from whisper_lens.cli import main
from whisper_lens.distributed import export, find_clips
from whisper_lens.pages.features import POSITION_SECONDS, feature_data, features_html
from whisper_lens.sae import train

from .browser import open_page
from .conftest import DATA

NAME = "encoder.blocks.2.resid_post"
CLIPS = [DATA / c for c in ("cards-001.flac", "cards-003.flac", "goforward.flac")]


@pytest.fixture(scope="module")
def sae(real_tiny_en, tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    export(real_tiny_en, find_clips(CLIPS, real_tiny_en), folder / "export", [NAME], progress=False)
    return train(folder / "export", NAME, folder / "sae", width=64, k=8, steps=4, batch_size=64, checkpoints=0).sae


@pytest.fixture(scope="module")
def latents(real_tiny_en, sae):
    return feature_data(real_tiny_en, CLIPS, name=NAME, sae=sae, top_k=3, batch_size=1)


@pytest.fixture(scope="module")
def neurons(real_tiny_en):
    name = "decoder.blocks.1.mlp.post"
    return feature_data(real_tiny_en, CLIPS[1:], name=name, features=range(24), top_k=2, batch_size=1)


def test_the_latents_page_holds_the_sae_s_own_activations(real_tiny_en, sae, latents):
    model = real_tiny_en
    assert [c["clip"] for c in latents["clips"]] == [p.name for p in CLIPS]
    per_clip = []
    for path in CLIPS:
        mel, (seconds,) = load_windows([path], model.dims.n_mels, 2 * model.dims.n_audio_ctx)  # as the page's runs
        x = model.run(mel, torch.tensor([[model.tokenizer.sot]]), trace=[NAME]).trace[NAME][0]  # (S, D)
        with torch.no_grad():
            z = sae.encode(x)[: math.ceil(seconds / POSITION_SECONDS)]  # (P, 64): the speech positions
        per_clip.append(z)
    every = torch.cat(per_clip)  # (N, 64)
    assert latents["positions"] == len(every)
    for f in latents["features"]:
        i = f["id"]
        assert f["density"] == pytest.approx(float((every[:, i] > 0).float().mean()), abs=1e-4)
        assert f["max"] == pytest.approx(float(every[:, i].max()), rel=2e-3)
        values = [m["value"] for m in f["moments"]]
        assert values == sorted(values, reverse=True) and len({m["clip"] for m in f["moments"]}) == len(values)
        for m in f["moments"]:
            z = per_clip[m["clip"]][:, i]
            assert m["value"] == pytest.approx(float(z.max()), rel=2e-3)
            at = round(m["t"] / POSITION_SECONDS - 0.5)  # the peak's position (fp16 storage may pick a near-tie)
            assert float(z[at]) == pytest.approx(float(z.max()), rel=2e-3)
            assert m["end"] - m["start"] == pytest.approx(min(1.0, latents["clips"][m["clip"]]["seconds"]), abs=1e-3)
            assert sum(f["hist"]) == int((every[:, i] > 0).sum())
    assert sum(bool(f["moments"]) for f in latents["features"]) > 10


def test_the_neurons_page_shows_the_tokens_at_the_peaks(real_tiny_en, neurons):
    assert neurons["kind"] == "neuron" and neurons["stack"] == "decoder" and len(neurons["features"]) == 24
    texts = [c["text"] for c in neurons["clips"]]
    for f in neurons["features"]:
        for m in f["moments"]:
            assert m["token"].strip() and m["token"].strip() in texts[m["clip"]]


def test_the_command_writes_a_page_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    out = tmp_path / "page.html"
    base = ["features", str(CLIPS[0]), "--name", "encoder.blocks.0.mlp.post", "--out", str(out)]
    assert main([*base, "--features", "0-3,7", "--top-k", "2"]) == 0
    html = out.read_text()
    assert html.count('"id":') >= 5 and "<script src" not in html and "<link" not in html  # everything inlined
    assert main([*base, "--features", "5000"]) == 2
    assert "feature 5000 is out of range" in capsys.readouterr().err
    assert main([*base[:3], "encoder.blocks.0.attn.pattern", *base[4:]]) == 2
    assert "heads come before positions" in capsys.readouterr().err


def _pixels(page, selector: str) -> np.ndarray:
    url = page.evaluate(f"document.querySelector('{selector}').toDataURL('image/png')")
    from io import BytesIO

    from PIL import Image

    return np.asarray(Image.open(BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


@pytest.mark.parametrize("which", ["latents", "neurons"])
def test_the_page_works_in_chromium(request, tmp_path, which):
    data = request.getfixturevalue(which)
    path = tmp_path / f"{which}.html"
    path.write_text(features_html(data))
    with open_page(path) as (page, errors):
        page.wait_for_function("window.features && window.features.ready")
        n = len(data["features"])
        assert page.locator("#list div").count() == n
        assert page.evaluate("features.filter('no such word at all')") == 0
        assert page.locator("#list div").count() == 0
        some = next(i for i, f in enumerate(data["features"]) if f["moments"])
        f = data["features"][some]
        assert page.evaluate(f"features.filter('{f['id']}')") >= 1
        page.evaluate("features.filter('')")
        page.locator(f"#list div[data-i='{some}']").click()
        page.wait_for_function(
            "[...document.querySelectorAll('#moments audio')].length > 0 && "
            "[...document.querySelectorAll('#moments audio')].every(a => a.readyState >= 1)",
            timeout=30000,
        )
        durations = page.evaluate("[...document.querySelectorAll('#moments audio')].map(a => a.duration)")
        assert durations == pytest.approx([m["end"] - m["start"] for m in f["moments"]], abs=2e-3)
        played = page.evaluate("document.querySelector('#moments audio').play().then(() => 'played', e => String(e))")
        assert played == "played"
        page.wait_for_function("document.querySelector('#moments audio').currentTime > 0", timeout=10000)
        page.wait_for_timeout(300)  # the spectrogram is drawn once the clip's mel is decoded
        spectrogram = _pixels(page, ".moment canvas")
        assert len(np.unique(spectrogram.reshape(-1, 3), axis=0)) > 30  # a picture, not a blank canvas
        assert (spectrogram == 255).all(-1).sum() > 20  # the white activation curve
        assert (_pixels(page, "#hist") == [59, 82, 139]).all(-1).sum() > 10  # the histogram's bars
        if which == "neurons":
            assert page.locator(".moment .tok").first.text_content() == f["moments"][0]["token"]
        page.screenshot(path=str(tmp_path / f"{which}.png"))
        assert (tmp_path / f"{which}.png").stat().st_size > 10_000
        assert errors == []
