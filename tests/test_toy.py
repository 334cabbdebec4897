"""The shipped toy model and its recipe: offline loading, exact sample transcripts, deterministic data, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import whisper_lens as wl
from whisper_lens.loading import SHIPPED
from whisper_lens.model import ModelDims, Whisper
from whisper_lens.toy import synth
from whisper_lens.toy.train import encode_batch, fit, init_weights, write_byte_vocab

TOY = SHIPPED["toy"]
espeak = pytest.mark.skipif(not synth.espeak_available(), reason="espeak-ng is not installed (setup.sh installs it)")


def test_shipped_model_loads_offline_and_transcribes_its_samples(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = wl.load_model()  # no argument: the shipped model
    assert model.tokenizer is not None and model.dims.n_vocab == 1864
    transcripts = json.loads((TOY / "samples" / "transcripts.json").read_text())
    assert 3 <= len(transcripts) <= 5  # the issue: 3-5 samples, each transcribed exactly (see the model card)
    paths = [TOY / "samples" / name for name in transcripts]
    mels, _ = wl.audio.load_windows(paths, model.dims.n_mels, 2 * model.dims.n_audio_ctx)
    results = model.generate(mels)
    assert [r.text.strip() for r in results] == list(transcripts.values())
    assert (TOY / "model.safetensors").stat().st_size <= 50 * 2**20


def test_sentences_are_deterministic_and_heldout_is_disjoint():
    train, heldout = synth.split(16000, 200, seed=0)
    assert synth.split(16000, 200, seed=0) == (train, heldout)
    assert synth.split(16000, 200, seed=1)[1] != heldout
    assert len(set(train)) == 16000 and len(set(heldout)) == 200
    assert not set(train) & set(heldout)
    words = {w for s in train for w in s.split()}
    assert {w for s in heldout for w in s.split()} <= words  # held-out: new combinations of known words


@espeak
def test_synthesis_is_deterministic_for_a_seed():
    clips = synth.plan(["the cat sleeps", "where is my red kite"], seed=5, no_speech=1.0)
    assert clips == synth.plan(["the cat sleeps", "where is my red kite"], seed=5, no_speech=1.0)
    for clip in clips:
        a, b = synth.render(clip), synth.render(clip)
        assert np.array_equal(a, b) and a.dtype == np.float32 and a.size >= synth.SAMPLE_RATE // 2
    assert any(c.text == "" for c in clips)  # no-speech clips are planned too
    spoken = [c for c in clips if c.text][0]
    assert np.abs(synth.render(spoken)).max() > 0.3  # speech, not silence
    assert synth.features(spoken).shape == (80, synth.N_FRAMES)


def test_targets_teach_no_speech_at_the_sot_position(tmp_path):
    tok = wl.load_tokenizer(write_byte_vocab(tmp_path / "b.tiktoken"), 1864)
    inputs, targets = encode_batch(["hi", ""], tok, np.array([False, True]))
    assert inputs[0].tolist() == [tok.sot, tok.no_timestamps, ord("h"), ord("i")]
    assert targets[0].tolist() == [tok.no_timestamps, ord("h"), ord("i"), tok.eot]
    assert targets[1].tolist() == [tok.no_speech, tok.eot, -100, -100]


@espeak
def test_a_few_training_steps_reduce_the_loss(tmp_path):
    tok = wl.load_tokenizer(write_byte_vocab(tmp_path / "b.tiktoken"), 1864)
    texts = ["the cat sleeps", "a dog runs", "my red kite", "where is the map"]
    clips = synth.plan(texts, seed=1, no_speech=0.0)
    mels = torch.from_numpy(np.stack([synth.features(c) for c in clips]))
    torch.manual_seed(0)
    model = init_weights(Whisper(ModelDims(80, 200, 64, 2, 2, 1864, 32, 64, 2, 2)))
    history = fit(model, tok, mels, texts, steps=30, batch_size=4, lr=3e-3, progress=False)
    first, last = np.mean([h["loss"] for h in history[:3]]), np.mean([h["loss"] for h in history[-3:]])
    assert last < 0.7 * first, (first, last)


def test_training_resumed_from_its_checkpoint_equals_training_straight_through(tmp_path):
    """The checkpoint is read with weights_only=True and holds everything the run needs: model, head, optimizer, rng."""
    tok = wl.load_tokenizer(write_byte_vocab(tmp_path / "b.tiktoken"), 1864)
    dims = ModelDims(80, 8, 16, 2, 1, 1864, 8, 16, 2, 1)
    mels, texts = torch.randn(6, 80, 16), ["ab", "cd", "", "e", "fg", "h"]

    def run(steps: list[int], checkpoint) -> tuple[Whisper, list[dict]]:
        torch.manual_seed(0)
        model = init_weights(Whisper(dims))
        for n in steps:  # each call resumes from where the checkpoint left off
            history = fit(model, tok, mels, texts, steps=n, batch_size=3, checkpoint=checkpoint, progress=False)
        return model, history

    straight, history = run([4], None)
    resumed, resumed_history = run([2, 4], tmp_path / "checkpoint.pt")  # lr_at gives 2 and 4 steps the same first 2
    assert [h["loss"] for h in resumed_history] == [h["loss"] for h in history]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
