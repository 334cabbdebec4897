"""Loading Whisper weights from every place they live, with every shape checked.

Sources ``load_model`` understands, tried in this order:

1. nothing / ``"toy"``: the model this project trained and ships in ``weights/toy`` (offline);
2. an official name (``"tiny"``, ``"base.en"``, ``"large-v3-turbo"``, ``"turbo"`` ...): fetched
   from its hub repository with huggingface-hub (only the files needed, cached);
3. an existing path: a directory in the hub's layout (``config.json`` + ``model.safetensors``
   [+ tokenizer files]) or an OpenAI ``.pt`` checkpoint (``{"dims", "model_state_dict"}``);
4. a hub id (``"openai/whisper-small"``).

OpenAI's state-dict keys are the model's own names; a hub (transformers) checkpoint goes
through one rename table, ``HF_TO_OPENAI``. Weights are memory-mapped and assigned to a
model built on the meta device, so nothing is copied until the dtype/device move.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import Tensor

from .files import atomic_write
from .model import ModelDims, Whisper

ASSETS = Path(__file__).resolve().parent / "assets"
# OpenAI's two tiktoken rank files (openai-whisper's assets, MIT): English-only and multilingual vocabularies
OFFICIAL_TOKENIZERS = {51864: ASSETS / "gpt2.tiktoken", 51865: ASSETS / "multilingual.tiktoken",
                       51866: ASSETS / "multilingual.tiktoken"}  # fmt: skip

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
SHIPPED = {"toy": WEIGHTS_DIR / "toy"}
DEFAULT_MODEL = "toy"


def _dims(mels: int, state: int, head: int, enc: int, dec: int, vocab: int) -> ModelDims:
    return ModelDims(mels, 1500, state, head, enc, vocab, 448, state, head, dec)


# name -> (hub repository, dims). The dims are facts of the published checkpoints.
OFFICIAL: dict[str, tuple[str, ModelDims]] = {
    "tiny.en": ("openai/whisper-tiny.en", _dims(80, 384, 6, 4, 4, 51864)),
    "tiny": ("openai/whisper-tiny", _dims(80, 384, 6, 4, 4, 51865)),
    "base.en": ("openai/whisper-base.en", _dims(80, 512, 8, 6, 6, 51864)),
    "base": ("openai/whisper-base", _dims(80, 512, 8, 6, 6, 51865)),
    "small.en": ("openai/whisper-small.en", _dims(80, 768, 12, 12, 12, 51864)),
    "small": ("openai/whisper-small", _dims(80, 768, 12, 12, 12, 51865)),
    "medium.en": ("openai/whisper-medium.en", _dims(80, 1024, 16, 24, 24, 51864)),
    "medium": ("openai/whisper-medium", _dims(80, 1024, 16, 24, 24, 51865)),
    "large-v1": ("openai/whisper-large", _dims(80, 1280, 20, 32, 32, 51865)),
    "large-v2": ("openai/whisper-large-v2", _dims(80, 1280, 20, 32, 32, 51865)),
    "large-v3": ("openai/whisper-large-v3", _dims(128, 1280, 20, 32, 32, 51866)),
    "large-v3-turbo": ("openai/whisper-large-v3-turbo", _dims(128, 1280, 20, 32, 4, 51866)),
    "turbo": ("openai/whisper-large-v3-turbo", _dims(128, 1280, 20, 32, 4, 51866)),
}

# Files fetched from a hub repository: the weights, their config, and the tokenizer.
HUB_FILES = [
    "config.json",
    "model.safetensors",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "normalizer.json",
    "generation_config.json",
    "preprocessor_config.json",
]

# transformers' WhisperForConditionalGeneration key -> OpenAI key, as (pattern, replacement), applied in order.
HF_TO_OPENAI: list[tuple[str, str]] = [
    (r"^model\.", ""),
    (r"^encoder\.embed_positions\.weight$", "encoder.positional_embedding"),
    (r"^decoder\.embed_positions\.weight$", "decoder.positional_embedding"),
    (r"^decoder\.embed_tokens\.", "decoder.token_embedding."),
    (r"^encoder\.layer_norm\.", "encoder.ln_post."),
    (r"^decoder\.layer_norm\.", "decoder.ln."),
    (r"\.layers\.(\d+)\.", r".blocks.\1."),
    (r"\.self_attn_layer_norm\.", ".attn_ln."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.final_layer_norm\.", ".mlp_ln."),
    (r"\.self_attn\.", ".attn."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.q_proj\.", ".query."),
    (r"\.k_proj\.", ".key."),
    (r"\.v_proj\.", ".value."),
    (r"\.out_proj\.", ".out."),
    (r"\.fc1\.", ".mlp.0."),
    (r"\.fc2\.", ".mlp.2."),
]
# Keys a hub checkpoint may carry that the model does not need: the unembedding tied to the token embedding.
HF_TIED = {"proj_out.weight"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, or not matching its own dims."""


def hf_to_openai(key: str) -> str:
    """HF key to OpenAI key (``model.encoder.layers.0.fc1.weight`` -> ``encoder.blocks.0.mlp.0.weight``)."""
    for pattern, repl in HF_TO_OPENAI:
        key = re.sub(pattern, repl, key)
    return key


def openai_to_hf(key: str) -> str:
    """The inverse of ``hf_to_openai``, used to save in the hub's layout."""
    fixed = {
        "encoder.positional_embedding": "model.encoder.embed_positions.weight",
        "decoder.positional_embedding": "model.decoder.embed_positions.weight",
    }
    if key in fixed:
        return fixed[key]
    for a, b in [
        ("decoder.token_embedding.", "decoder.embed_tokens."), ("encoder.ln_post.", "encoder.layer_norm."),
        ("decoder.ln.", "decoder.layer_norm."), (".attn_ln.", ".self_attn_layer_norm."),
        (".cross_attn_ln.", ".encoder_attn_layer_norm."), (".mlp_ln.", ".final_layer_norm."),
        (".cross_attn.", ".encoder_attn."), (".attn.", ".self_attn."), (".query.", ".q_proj."),
        (".key.", ".k_proj."), (".value.", ".v_proj."), (".out.", ".out_proj."), (".mlp.0.", ".fc1."),
        (".mlp.2.", ".fc2."), (".blocks.", ".layers."),
    ]:  # fmt: skip
        key = key.replace(a, b)
    return "model." + key


def dims_from_hf_config(config: Mapping) -> ModelDims:
    """ModelDims from a transformers ``WhisperConfig`` dictionary (one ``d_model`` for both stacks)."""
    try:
        return ModelDims(
            n_mels=config["num_mel_bins"],
            n_audio_ctx=config["max_source_positions"],
            n_audio_state=config["d_model"],
            n_audio_head=config["encoder_attention_heads"],
            n_audio_layer=config["encoder_layers"],
            n_vocab=config["vocab_size"],
            n_text_ctx=config["max_target_positions"],
            n_text_state=config["d_model"],
            n_text_head=config["decoder_attention_heads"],
            n_text_layer=config["decoder_layers"],
        )
    except KeyError as e:
        raise CheckpointError(f"config.json is not a Whisper config: it has no {e.args[0]!r}") from None


def special_ids(n_vocab: int) -> tuple[int, int]:
    """(<|startoftranscript|>, <|endoftext|>) of Whisper's layout: the ranks, then eot, sot, languages, ... 1501 times.

    1509 special tokens besides the languages: 99 languages, or 100 for the v3 vocabulary (51866).
    """
    eot = n_vocab - 1509 - (100 if n_vocab >= 51866 else 99)
    return eot + 1, eot


def hf_config_from_dims(dims: ModelDims, sot: int | None = None, eot: int | None = None) -> dict:
    """A transformers ``WhisperConfig`` dictionary for ``dims`` (the hub layout our saved models use).

    ``sot``/``eot`` default to the ids of Whisper's special-token layout for ``dims.n_vocab``.
    """
    if sot is None or eot is None:
        sot, eot = special_ids(dims.n_vocab)
    if dims.n_audio_state != dims.n_text_state:
        raise ValueError("the hub layout has one d_model: encoder and decoder widths must be equal")
    return {
        "model_type": "whisper",
        "architectures": ["WhisperForConditionalGeneration"],
        "num_mel_bins": dims.n_mels,
        "max_source_positions": dims.n_audio_ctx,
        "d_model": dims.n_audio_state,
        "encoder_attention_heads": dims.n_audio_head,
        "encoder_layers": dims.n_audio_layer,
        "encoder_ffn_dim": 4 * dims.n_audio_state,
        "vocab_size": dims.n_vocab,
        "max_target_positions": dims.n_text_ctx,
        "decoder_attention_heads": dims.n_text_head,
        "decoder_layers": dims.n_text_layer,
        "decoder_ffn_dim": 4 * dims.n_text_state,
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------- entry point


def load_model(
    source: str | os.PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer=None,
) -> Whisper:
    """Load a Whisper model: the shipped toy model, an official name, a hub id, an HF directory or an OpenAI .pt.

    ``tokenizer``: a ``Tokenizer``, or a path to one (a ``.tiktoken`` file or an HF directory);
    by default the one found beside the weights, else ``None``.
    """
    from .ct2 import is_ct2_folder, read_ct2_folder  # here: ct2 imports CheckpointError from this module

    folder, pt_file = resolve(source)
    if pt_file is not None:
        dims, state = read_openai_checkpoint(pt_file)
    elif is_ct2_folder(folder):
        ct2 = read_ct2_folder(folder)
        dims, state = ct2.dims, ct2.state
    else:
        dims, state = read_hf_folder(folder)
    model = build(dims, state)
    model.to(device=device, dtype=dtype)
    model.tokenizer = _find_tokenizer(tokenizer, folder if folder is not None else pt_file.parent, dims)
    return model.eval()


def resolve(source: str | os.PathLike | None) -> tuple[Path | None, Path | None]:
    """Where the weights are: (HF-layout folder, None) or (None, OpenAI .pt file). Downloads official names."""
    if source is None:
        source = DEFAULT_MODEL
    if isinstance(source, str) and source in SHIPPED:
        folder = SHIPPED[source]
        if not (folder / "config.json").exists():
            raise CheckpointError(f"the shipped model {source!r} is missing from {folder} (incomplete checkout?)")
        return folder, None
    if isinstance(source, str) and source in OFFICIAL:
        return fetch(OFFICIAL[source][0]), None
    path = Path(source).expanduser()
    if path.is_dir():
        return path, None
    if path.is_file():
        if path.suffix in (".pt", ".pth", ".bin") or path.suffix == "":
            return None, path
        if path.name == "config.json" or path.suffix == ".safetensors":
            return path.parent, None
        raise CheckpointError(f"{path} is not a Whisper checkpoint: give an HF-layout directory or an OpenAI .pt file")
    if isinstance(source, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/")):
        return fetch(source), None
    names = ", ".join(list(SHIPPED) + list(OFFICIAL))
    raise CheckpointError(f"unknown model {str(source)!r}: not a path that exists, nor one of: {names}")


def fetch(repo_id: str) -> Path:
    """Download (or find in the hub cache) the files a Whisper repository needs; return the local folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except RepositoryNotFoundError:
        raise CheckpointError(f"hub repository {repo_id!r} does not exist (or is private)") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"cannot download {repo_id!r} (no network?) and it is not in the hub cache; run "
            f"`whisper-lens download` where there is network, or pass a local directory or .pt file"
        ) from None
    except OSError as e:  # connection errors and the like
        raise CheckpointError(f"cannot download {repo_id!r}: {e}; pass a local directory or .pt file") from None


# ----------------------------------------------------------------------------- readers


def read_hf_folder(folder: Path) -> tuple[ModelDims, dict[str, Tensor]]:
    """Dims and OpenAI-keyed weights of a directory in the hub's layout."""
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for p in (config_path, weights_path):
        if not p.exists():
            raise CheckpointError(f"{folder} is not a Whisper model directory: {p.name} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
    dims = dims_from_hf_config(config)
    state = {}
    for key, x in read_safetensors(weights_path).items():
        if key in HF_TIED:
            continue
        state[hf_to_openai(key)] = x
    return dims, state


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Memory-mapped tensors of a safetensors file (no copy on CPU); a corrupt file is a CheckpointError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def read_openai_checkpoint(path: Path) -> tuple[ModelDims, dict[str, Tensor]]:
    """Dims and weights of an OpenAI checkpoint ``{"dims": {...}, "model_state_dict": {...}}``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds here (zip, pickle, runtime) for a file that is not a checkpoint
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is not an OpenAI Whisper checkpoint (want a dict with 'dims' and 'model_state_dict')"
        )
    names = {f.name for f in fields(ModelDims)}
    raw = checkpoint["dims"]
    if not isinstance(raw, dict) or set(raw) != names:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path}: 'dims' must have the fields {sorted(names)}, got {got}")
    return ModelDims(**raw), dict(checkpoint["model_state_dict"])


def build(dims: ModelDims, state: Mapping[str, Tensor]) -> Whisper:
    """A model of ``dims`` holding ``state``, after checking every key and shape against the architecture."""
    with torch.device("meta"):
        model = Whisper(dims)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} key(s): {', '.join(missing[:5])}")
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected key(s): {', '.join(unexpected[:5])}")
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(
                f"shape mismatch for {k}: checkpoint has {tuple(state[k].shape)}, model wants {shape}"
            )
    model.load_state_dict(dict(state), strict=True, assign=True)
    return model


def _find_tokenizer(tokenizer, folder: Path, dims: ModelDims):
    """The tokenizer given, or the one beside the weights (a *.tiktoken file or vocab.json), or OpenAI's for
    ``n_vocab`` (51864: English-only, 51865 / 51866: multilingual), or None for any other vocabulary."""
    from .tokenizer import Tokenizer, load_tokenizer

    if isinstance(tokenizer, Tokenizer):
        if tokenizer.n_vocab != dims.n_vocab:
            raise ValueError(f"tokenizer has n_vocab {tokenizer.n_vocab}, the model {dims.n_vocab}")
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer, n_vocab=dims.n_vocab)
    ranks = sorted(folder.glob("*.tiktoken"))
    if len(ranks) == 1:
        return load_tokenizer(ranks[0], n_vocab=dims.n_vocab)
    if (folder / "vocab.json").exists():
        return load_tokenizer(folder, n_vocab=dims.n_vocab)
    if dims.n_vocab in OFFICIAL_TOKENIZERS:
        return load_tokenizer(OFFICIAL_TOKENIZERS[dims.n_vocab], n_vocab=dims.n_vocab)
    return None


# ----------------------------------------------------------------------------- writers


def save_model(model: Whisper, folder: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None) -> Path:
    """Save in the hub's layout (config.json + model.safetensors with transformers' keys [+ tokenizer file]).

    transformers' ``WhisperForConditionalGeneration.from_pretrained(folder)`` reads the result too.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = model.tokenizer
    sot, eot = (tok.sot, tok.eot) if tok is not None else special_ids(model.dims.n_vocab)
    config = hf_config_from_dims(model.dims, sot=sot, eot=eot)
    state = {openai_to_hf(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write(folder / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    if tokenizer_file is not None:
        src = Path(tokenizer_file)
        atomic_write(folder / src.name, lambda p: Path(p).write_bytes(src.read_bytes()))
    return folder


def save_openai_checkpoint(model: Whisper, path: str | os.PathLike) -> Path:
    """Save as OpenAI's ``.pt`` layout (``{"dims", "model_state_dict"}``), which openai-whisper loads."""
    path = Path(path)
    checkpoint = {"dims": asdict(model.dims), "model_state_dict": model.state_dict()}
    atomic_write(path, lambda p: torch.save(checkpoint, p))
    return path


def download(name: str) -> Path:
    """Fetch an official model (or hub id) into the hub cache; return its local folder."""
    if name in SHIPPED:
        return SHIPPED[name]
    repo = OFFICIAL[name][0] if name in OFFICIAL else name
    if name not in OFFICIAL and not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise CheckpointError(f"unknown model {name!r}; official names: {', '.join(OFFICIAL)}")
    return fetch(repo)
