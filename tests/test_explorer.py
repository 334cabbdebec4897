"""The clip explorer page, in headless Chromium, on the real tiny.en and the shipped speech.

The attention the page draws for a clicked token is read back from the page (``window.explorer.view()``)
and compared with ``model.run``'s own trace, recorded here independently of the page's code.
"""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
import torch

from tests.browser import open_page
from whisper_lens.audio import load_windows
from whisper_lens.pages.common import Inline, decode_array, encode_array, write_page
from whisper_lens.pages.explorer import explorer_data, explorer_html, token_texts, write_explorer
from whisper_lens.study import SPEECH

CLIP = SPEECH / "austen-0880.flac"  # 3 s: "he was not an ill disposed young man"


@pytest.fixture(scope="module")
def explored(real_tiny_en, tmp_path_factory):
    """(page path, the page's data) for CLIP, written by write_explorer."""
    path = tmp_path_factory.mktemp("explorer") / "clip.html"
    write_explorer(real_tiny_en, CLIP, path)
    blob = re.search(r"id='wl-data'>(.*?)</script>", path.read_text(), re.S).group(1)
    return path, json.loads(blob.replace("<\\/", "</"))


@pytest.fixture(scope="module")
def reference(real_tiny_en, explored):
    """The cross-attention of the page's token sequence, from model.run (L, H, T, S)."""
    _, data = explored
    tok = real_tiny_en.tokenizer
    text = [t["id"] for t in data["tokens"][:-1]]
    seq = [*tok.sot_sequence, tok.no_timestamps, *text]
    assert data["fed_ids"] == seq and data["tokens"][-1]["id"] == tok.eot
    mel, _ = load_windows([CLIP], real_tiny_en.dims.n_mels, 2 * real_tiny_en.dims.n_audio_ctx)
    with torch.no_grad():
        trace = real_tiny_en.run(mel, torch.tensor([seq]), trace="decoder.blocks.*.cross_attn.pattern").trace
    L = real_tiny_en.dims.n_text_layer
    return torch.stack([trace[f"decoder.blocks.{i}.cross_attn.pattern"][0] for i in range(L)]).numpy()


def test_page_content(explored, real_tiny_en):
    path, data = explored
    d = real_tiny_en.dims
    assert data["text"].lower().startswith("he was not")
    assert [w["word"].strip().lower() for w in data["words"]][:3] == ["he", "was", "not"]
    assert all(0 <= w["start"] <= w["end"] <= data["seconds"] + 0.02 for w in data["words"])
    assert abs(data["seconds"] - 2.99) < 0.01 and data["positions"] == 150 + 25  # 3 s of 20 ms, then 0.5 s
    cross = decode_array(data["arrays"]["cross"])
    assert cross.shape == (d.n_text_layer, d.n_text_head, len(data["tokens"]), data["positions"])
    after = decode_array(data["arrays"]["cross_after"])
    np.testing.assert_allclose(cross.sum(-1) + after, 1.0, atol=2e-3)  # each row a distribution (u16 sums)
    assert path.stat().st_size < 400_000  # 3 s of tiny.en: the page stays small
    assert "http://" not in path.read_text() and "https://" not in path.read_text()  # nothing fetched


def test_browser_click_shows_that_tokens_attention(explored, reference, tmp_path):
    path, data = explored
    first = data["first_row"]
    P = data["positions"]
    with open_page(path) as (page, errors):
        page.wait_for_function("window.explorer && window.explorer.ready", timeout=30_000)
        for i in (3, 0):  # a click changes the view to that token's rows
            page.click(f'#transcript .tok[data-token="{i}"]')
            view = page.evaluate("window.explorer.view()")
            assert view["token"] == i
            heads = np.array(view["heads"])  # (L, H, P)
            np.testing.assert_allclose(heads, reference[:, :, first + i, :P], atol=1e-4)
            np.testing.assert_allclose(np.array(view["mean"]), reference[:, :, first + i, :P].mean(1), atol=1e-4)
            assert page.locator("#transcript .tok.sel").get_attribute("data-token") == str(i)
        lens_text = page.inner_text("#lens")
        top = data["vocab"][str(data["lens_ids"][-1][0][0])]  # the final layer's top token at token 0
        assert json.dumps(top) in lens_text
        # the audio plays and the cursor follows it
        before = page.evaluate("document.getElementById('cursor').style.left")
        page.evaluate("document.getElementById('audio').play()")
        page.wait_for_function("document.getElementById('audio').currentTime > 0.3", timeout=10_000)
        after = page.evaluate("document.getElementById('cursor').style.left")
        assert float(after.rstrip("%")) > float(before.rstrip("%") or 0) + 5
        # a head of the grid opens its full pattern
        page.select_option("#gridkind", "self")
        page.click("#grid figure >> nth=1")
        assert "decoder.blocks.0.attn.pattern, head 1" in page.inner_text("#full")
        shot = tmp_path / "explorer.png"
        page.screenshot(path=str(shot), full_page=True)
        assert not errors, errors
    from matplotlib.image import imread

    img = imread(shot)[..., :3]
    assert img.shape[0] > 800 and img.std() > 0.1  # not blank: the spectrogram and the strips are drawn
    assert len(np.unique((img[::7, ::7] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200


def test_token_texts_merge_partial_bytes(real_tiny_en):
    tok = real_tiny_en.tokenizer
    ids = tok.encode(" Grüße 😀 東京")
    texts = token_texts(tok, ids)
    assert len(texts) == len(ids) and "\ufffd" not in "".join(texts)
    assert "".join(t for t in texts if t != "\u2026") == " Grüße 😀 東京"
    assert token_texts(tok, [tok.sot, tok.eot]) == ["SOT", "EOT"]
    assert token_texts(tok, ids[4:5]) == ["<20 f0 9f 98>"]  # ' 😀' cut after 3 of its bytes: the bytes shown


def test_arrays_round_trip_within_the_stated_error():
    a = np.random.default_rng(0).random((3, 4, 50)).astype(np.float32)
    for kind, bound in (("u16", 1 / 131070), ("u8", 1 / 510), ("f32", 0.0)):
        spec = json.loads(json.dumps(encode_array(a, kind)))
        assert np.abs(decode_array(spec) - a).max() <= bound * (a.max() - a.min()) + 1e-7
    with pytest.raises(ValueError, match="NaN"):
        encode_array(np.array([np.nan]))


def test_pages_never_replace_a_foreign_file(tmp_path, explored):
    _, data = explored
    foreign = tmp_path / "mine.html"
    foreign.write_text("<p>my notes</p>")
    with pytest.raises(FileExistsError, match="not a page whisper-lens wrote"):
        write_page(foreign, "x")
    assert foreign.read_text() == "<p>my notes</p>"
    with pytest.raises(ValueError, match=r"ending in \.html"):
        write_page(tmp_path / "page.txt", "x")
    ours = tmp_path / "ours.html"
    write_page(ours, explorer_html(data))
    write_page(ours, explorer_html(data))  # its own page is replaced
    inline = Inline(explorer_html(data))._repr_html_()
    assert inline.startswith("<iframe srcdoc=") and html.unescape(inline).count("id='wl-data'") == 1


def test_cli_explore_on_the_toy(tmp_path):
    from whisper_lens.cli import main

    out = tmp_path / "toy.html"
    longer = str(SPEECH / "austen-0870.flac")  # 7.1 s: longer than the toy's 4 s window
    assert main(["explore", longer, "--out", str(out), "--no-progress"]) == 2
    from whisper_lens.loading import SHIPPED

    sample = sorted((SHIPPED["toy"] / "samples").glob("*.wav"))[0]
    assert main(["explore", str(sample), "--out", str(out), "--no-progress"]) == 0
    assert "<meta name='generator' content='whisper-lens'>" in out.read_text()[:400]


def test_explorer_data_rejects_a_clip_longer_than_the_window(real_tiny_en):
    with pytest.raises(ValueError, match="longer than the model's 30 s window"):
        explorer_data(real_tiny_en, np.zeros(31 * 16000, np.float32))
