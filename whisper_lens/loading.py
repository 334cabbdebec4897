"""Loading Whisper weights from every place they live, with every shape checked.

Sources ``load_model`` understands, tried in this order:

1. nothing / ``"toy"``: the model this project trained and ships in ``weights/toy`` (offline);
2. an official name (``"tiny"``, ``"base.en"``, ``"large-v3-turbo"``, ``"turbo"`` ...): looked up on
   disk first (the hub cache of ``openai/whisper-NAME``; openai-whisper's ``~/.cache/whisper/NAME.pt``,
   its published SHA256 checked; the hub cache of faster-whisper's conversion), else downloaded
   from ``openai/whisper-NAME`` with huggingface-hub (only the files needed, cached);
3. an existing path: a directory in the hub's layout (``config.json`` + ``model.safetensors``
   [+ tokenizer files]), a CTranslate2 directory (faster-whisper's ``model.bin`` + ``config.json``
   [+ ``tokenizer.json``], read by ``ct2.py``) or an OpenAI ``.pt`` checkpoint
   (``{"dims", "model_state_dict"}``);
4. a hub id (``"openai/whisper-small"``, ``"Systran/faster-whisper-small"``).

OpenAI's state-dict keys are the model's own names; a hub (transformers) checkpoint goes
through one rename table, ``HF_TO_OPENAI``. Weights are memory-mapped and assigned to a
model built on the meta device, so nothing is copied until the dtype/device move, and nothing
is built before every key and shape has been checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from .files import atomic_write, write_text
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

# openai-whisper's checkpoints, as its download URLs name them: name -> (file in ~/.cache/whisper, SHA256).
OPENAI_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "tiny.en": ("tiny.en.pt", "d3dd57d32accea0b295c96e26691aa14d8822fac7d9d27d5dc00b4ca2826dd03"),
    "tiny": ("tiny.pt", "65147644a518d12f04e32d6f3b26facc3f8dd46e5390956a9424a650c0ce22b9"),
    "base.en": ("base.en.pt", "25a8566e1d0c1e2231d1c762132cd20e0f96a85d16145c3a00adf5d1ac670ead"),
    "base": ("base.pt", "ed3a0b6b1c0edf879ad9b11b1af5a0e6ab5db9205f891f668f8b0e6c6326e34e"),
    "small.en": ("small.en.pt", "f953ad0fd29cacd07d5a9eda5624af0f6bcf2258be67c92b79389873d91e0872"),
    "small": ("small.pt", "9ecf779972d90ba49c06d968637d720dd632c55bbf19d441fb42bf17a411e794"),
    "medium.en": ("medium.en.pt", "d7440d1dc186f76616474e0ff0b3b6b879abc9d1a4926b7adfa41db2d497ab4f"),
    "medium": ("medium.pt", "345ae4da62f9b3d59415adc60127b97c714f32e89e936602e85993674d08dcb1"),
    "large-v1": ("large-v1.pt", "e4b87e7e0bf463eb8e6956e646f1e277e901512310def2c24bf0e11bd3c28e9a"),
    "large-v2": ("large-v2.pt", "81f7c96c852ee8fc832187b0132e569d6c3065a3252ed18e56effd0b6a73e524"),
    "large-v3": ("large-v3.pt", "e5b1a55b89c1367dacf97e3e19bfd829a01529dbfdeefa8caeb59b3f1b81dadb"),
    "large-v3-turbo": ("large-v3-turbo.pt", "aff26ae408abcba5fbf8813c21e62b0941638c5f6eebfb145be0c9839262a19a"),
    "turbo": ("large-v3-turbo.pt", "aff26ae408abcba5fbf8813c21e62b0941638c5f6eebfb145be0c9839262a19a"),
}
# faster-whisper's CTranslate2 conversions on the hub (its own table of names).
FASTER_WHISPER: dict[str, str] = {name: f"Systran/faster-whisper-{name}" for name in OFFICIAL} | {
    "large-v3-turbo": "mobiuslabsgmbh/faster-whisper-large-v3-turbo",
    "turbo": "mobiuslabsgmbh/faster-whisper-large-v3-turbo",
}
# OpenAI's alignment heads, (layer, head) per official model: openai-whisper's _ALIGNMENT_HEADS masks,
# decoded once into assets/alignment_heads.json (MIT, see assets/README.md).
OFFICIAL_ALIGNMENT_HEADS: dict[str, list[tuple[int, int]]] = {
    name: [(layer, head) for layer, head in pairs]
    for name, pairs in json.loads((ASSETS / "alignment_heads.json").read_text()).items()
}

# Other names openai-whisper and faster-whisper accept for the same checkpoints.
ALIASES = {"large": "large-v3"}
# distil-whisper's models (faster-whisper's names): name -> (hub repository, faster-whisper's conversion, dims).
DISTIL: dict[str, tuple[str, str, ModelDims]] = {
    "distil-large-v2": ("distil-whisper/distil-large-v2", "Systran/faster-distil-whisper-large-v2",
                        _dims(80, 1280, 20, 32, 2, 51865)),
    "distil-large-v3": ("distil-whisper/distil-large-v3", "Systran/faster-distil-whisper-large-v3",
                        _dims(128, 1280, 20, 32, 2, 51866)),
    "distil-large-v3.5": ("distil-whisper/distil-large-v3.5", "distil-whisper/distil-large-v3.5-ct2",
                          _dims(128, 1280, 20, 32, 2, 51866)),
    "distil-medium.en": ("distil-whisper/distil-medium.en", "Systran/faster-distil-whisper-medium.en",
                         _dims(80, 1024, 16, 24, 2, 51864)),
    "distil-small.en": ("distil-whisper/distil-small.en", "Systran/faster-distil-whisper-small.en",
                        _dims(80, 768, 12, 12, 4, 51864)),
}  # fmt: skip
NAMES = [*SHIPPED, *OFFICIAL, *ALIASES, *DISTIL]  # every model name load_model knows

# Files fetched from a hub repository: the weights, their config, and the tokenizer, in the hub's
# (transformers) layout or faster-whisper's (CTranslate2: model.bin, tokenizer.json, vocabulary.*).
HUB_FILES = [
    "config.json",
    "model.safetensors",
    "model.bin",
    "tokenizer.json",
    "vocabulary.*",
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


def dims_from_hf_config(config: Mapping, path: Path | str = "config.json") -> ModelDims:
    """ModelDims from a transformers ``WhisperConfig`` dictionary (one ``d_model`` for both stacks)."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{path} must hold a JSON object (a Whisper config), got a {type(config).__name__}")
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
        raise CheckpointError(f"{path} is not a Whisper config: it has no {e.args[0]!r}") from None
    except ValueError as e:  # ModelDims' own checks
        raise CheckpointError(f"{path}: {e}") from None


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

# The dtypes a model may be loaded in, by the names people write them with.
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}  # fmt: skip


@dataclass(frozen=True)
class Found:
    """Where a model's files are, as ``resolve`` found them: a folder (hub layout or CTranslate2) or an OpenAI
    ``.pt``, and the official name it was asked for by (which fixes its alignment heads)."""

    folder: Path | None = None
    pt_file: Path | None = None
    name: str | None = None

    @property
    def where(self) -> Path:
        return self.folder if self.folder is not None else self.pt_file


def load_model(
    source: str | os.PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    tokenizer=None,
    download_root: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Whisper:
    """Load a Whisper model: the shipped toy model, an official name, a hub id, a folder (hub layout or
    faster-whisper's CTranslate2 layout) or an OpenAI .pt.

    ``dtype``: a floating-point ``torch.dtype`` or its name (``"float16"``); quantised CTranslate2
    weights are dequantised to it. ``tokenizer``: a ``Tokenizer``, or a path to one (a ``.tiktoken``
    file, a vocabulary file or a folder holding one); by default the one found beside the weights,
    else OpenAI's for the model's vocabulary size, else ``None``. ``model.alignment_heads``: see
    ``alignment_heads_for``. ``download_root``: where names are looked for and downloaded to, in
    place of the hub cache and ``~/.cache/whisper`` (openai-whisper's ``download_root``, faster-whisper's
    ``download_root``); ``local_files_only``: never download (faster-whisper's name).
    """
    device, dtype = check_placement(device, dtype)
    found = resolve(source, download_root, bool(local_files_only))
    dims, state, heads = read_weights(found)
    model = build(dims, state, found.where)
    model.to(device=device, dtype=dtype)
    model.tokenizer = _find_tokenizer(tokenizer, found.folder or found.pt_file.parent, dims)
    model.alignment_heads = heads if heads is not None else alignment_heads_for(found, dims)
    model.transcribe_defaults = read_transcribe_defaults(found.folder) if found.folder is not None else {}
    return model.eval()


def check_placement(device, dtype) -> tuple[torch.device, torch.dtype]:
    """``device`` and ``dtype`` as torch objects, refused here (one line) when this machine cannot use them."""
    names = ", ".join(FLOAT_DTYPES)
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in FLOAT_DTYPES:
        dtype = FLOAT_DTYPES[dtype.removeprefix("torch.")]
    if dtype not in FLOAT_DTYPES.values():
        raise ValueError(f"dtype must be a floating-point torch.dtype or its name ({names}), got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device (use 'cpu', 'cuda', 'cuda:1' or 'mps')") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device.type not in available:
        raise ValueError(f"device {str(device)!r}: whisper_lens runs on cpu, cuda or mps")
    if not available[device.type]:
        raise ValueError(f"device {str(device)!r}: no {device.type} device is available to torch here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: there are {torch.cuda.device_count()} CUDA devices")
    return device, dtype


def read_weights(found: Found) -> tuple[ModelDims, dict[str, Tensor], list[tuple[int, int]] | None]:
    """Dims, OpenAI-keyed weights, and the alignment heads stored with them (None when none are)."""
    from .ct2 import is_ct2_folder, read_ct2_folder  # here: ct2 imports CheckpointError from this module

    if found.pt_file is not None:
        dims, state = read_openai_checkpoint(found.pt_file)
        return dims, state, None
    if is_ct2_folder(found.folder):
        ct2 = read_ct2_folder(found.folder)
        return ct2.dims, ct2.state, ct2.alignment_heads
    dims, state = read_hf_folder(found.folder)
    return dims, state, read_generation_heads(found.folder, dims)


def resolve(source: str | os.PathLike | None, root: str | os.PathLike | None = None, local: bool = False) -> Found:
    """Where the weights are. Names are looked up on disk first (in ``root`` if given), then downloaded unless
    ``local``."""
    if source is None:
        source = DEFAULT_MODEL
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"load_model wants a model name, hub id or path, got {type(source).__name__} {source!r}")
    if not os.fspath(source).strip():  # Path("") is the current folder: never read it unasked
        raise ValueError(
            f"the model name or path is empty ({source!r}): give a name such as 'toy' or 'tiny.en', or a path"
        )
    if isinstance(source, str) and source in SHIPPED:
        folder = SHIPPED[source]
        if not (folder / "config.json").exists():
            raise CheckpointError(f"the shipped model {source!r} is missing from {folder} (incomplete checkout?)")
        return Found(folder=folder)
    if isinstance(source, str) and source in ALIASES:
        source = ALIASES[source]
    if isinstance(source, str) and source in OFFICIAL:
        return find_official(source, root, local)
    if isinstance(source, str) and source in DISTIL:
        repo, faster, _ = DISTIL[source]
        for repo_id, needed in ((repo, ("config.json", "model.safetensors")), (faster, ("config.json", "model.bin"))):
            if (folder := hub_cached(repo_id, needed, root)) is not None:
                return Found(folder=folder)
        return Found(folder=fetch(repo, root, local))
    path = Path(source).expanduser()
    if path.is_dir():
        return Found(folder=path)
    if path.is_file():
        if path.name == "model.bin" or path.name == "config.json" or path.suffix == ".safetensors":
            return Found(folder=path.parent)
        if path.suffix in (".pt", ".pth", ".bin") or path.suffix == "":
            return Found(pt_file=path)
        raise CheckpointError(
            f"{path} is not a Whisper checkpoint: give a model folder (hub or CTranslate2 layout) or an OpenAI .pt file"
        )
    if isinstance(source, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/")):
        return Found(folder=fetch(source, root, local))
    names = ", ".join(NAMES)
    raise CheckpointError(f"unknown model {str(source)!r}: not a path that exists, nor one of: {names}")


def find_official(name: str, root: str | os.PathLike | None = None, local: bool = False) -> Found:
    """An official model from disk if it is anywhere a Whisper tool keeps it, else downloaded from the hub.

    Looked up in order: the hub cache of ``openai/whisper-NAME`` (transformers' layout), openai-whisper's
    cache (``$XDG_CACHE_HOME/whisper`` or ``~/.cache/whisper``: ``NAME.pt``, whose SHA256 must be the one
    in openai-whisper's download URL), the hub cache of faster-whisper's conversion; then a download of
    ``openai/whisper-NAME``. Offline with nothing found, the error names every place looked.
    """
    from huggingface_hub.constants import HF_HUB_CACHE

    repo, faster = OFFICIAL[name][0], FASTER_WHISPER[name]
    file, sha256 = OPENAI_CHECKPOINTS[name]
    pt_file = (Path(root).expanduser() if root is not None else openai_whisper_cache()) / file
    looked = [f"the hub cache {root or HF_HUB_CACHE} for {repo}", str(pt_file), f"the hub cache for {faster}"]
    if (folder := hub_cached(repo, ("config.json", "model.safetensors"), root)) is not None:
        return Found(folder=folder, name=name)
    if pt_file.is_file():
        if file_sha256(pt_file) == sha256:
            return Found(pt_file=pt_file, name=name)
        looked[1] += " (present, but its SHA256 is not the published one: a partial or altered download)"
    if (folder := hub_cached(faster, ("config.json", "model.bin"), root)) is not None:
        return Found(folder=folder, name=name)
    try:
        return Found(folder=fetch(repo, root, local), name=name)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (looked on disk in {'; '.join(looked)})") from None


def hub_cached(repo_id: str, needed: tuple[str, ...], root: str | os.PathLike | None = None) -> Path | None:
    """The cached snapshot of a hub repository (its main revision) when it holds the files ``needed``; no network.

    ``root``: a hub cache folder of the user's choosing (``download_root``), else the hub's default.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(needed), local_files_only=True, cache_dir=root))
    except (LocalEntryNotFoundError, OSError):
        return None
    return folder if all((folder / f).is_file() for f in needed) else None


def openai_whisper_cache() -> Path:
    """Where openai-whisper's ``load_model`` keeps its downloads."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "whisper"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch(repo_id: str, root: str | os.PathLike | None = None, local: bool = False) -> Path:
    """Download (or find in the hub cache, or ``root``) the files a Whisper repository needs; return the local folder.

    ``local``: never download (the error says where it looked).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    if local:
        if (folder := hub_cached(repo_id, ("config.json",), root)) is not None:
            return folder
        raise CheckpointError(f"{repo_id!r} is not on disk (looked in the hub cache {root or 'default'}) and "
                              "local_files_only forbids downloading it")  # fmt: skip
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, cache_dir=root))
    except RepositoryNotFoundError:
        raise CheckpointError(f"hub repository {repo_id!r} does not exist (or is private)") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"cannot download {repo_id!r} (no network?) and it is not in the hub cache; run "
            f"`whisper-lens download` where there is network, or pass a local directory or .pt file"
        ) from None
    except OSError as e:  # connection errors and the like
        raise CheckpointError(f"cannot download {repo_id!r}: {e}; pass a local directory or .pt file") from None


# ----------------------------------------------------------------------------- alignment heads


def alignment_heads_for(found: Found, dims: ModelDims) -> list[tuple[int, int]] | None:
    """OpenAI's alignment heads for a checkpoint that stores none beside it, or None when it is not an official model.

    By the official name it was loaded by; for a ``.pt`` named as openai-whisper names its files
    (``tiny.en.pt``), by that name; else by its dims when exactly one official model has them
    (every one but large-v1 / large-v2, which share theirs). Heads stored with the weights (a
    CTranslate2 config.json, a hub generation_config.json) come first: see ``read_weights``.
    """
    if found.name in OFFICIAL_ALIGNMENT_HEADS and OFFICIAL[found.name][1] == dims:
        return OFFICIAL_ALIGNMENT_HEADS[found.name]
    if found.pt_file is not None:
        by_file = [n for n, (file, _) in OPENAI_CHECKPOINTS.items() if file == found.pt_file.name]
        if by_file and OFFICIAL[by_file[0]][1] == dims:
            return OFFICIAL_ALIGNMENT_HEADS[by_file[0]]
    tables = {tuple(OFFICIAL_ALIGNMENT_HEADS[n]) for n, (_, d) in OFFICIAL.items() if d == dims}
    return list(tables.pop()) if len(tables) == 1 else None


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (a config), or a ``CheckpointError`` naming the file."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got a {type(config).__name__}")
    return config


DEFAULTS_KEY = "whisper_lens_transcribe"  # in config.json: how a model wants to be decoded when not told
DEFAULT_KINDS = {"timestamps": bool, "condition_on_previous_text": bool, "pad_with_silence": bool}  # a model's own


def read_transcribe_defaults(folder: Path) -> dict:
    """The decoding defaults a model carries in its ``config.json`` (``{}`` for Whisper's own models).

    The shipped toy was trained without timestamps and without a previous-text prompt, on clips
    padded with silence (``audio.load_windows``), so its config says ``"whisper_lens_transcribe":
    {"timestamps": false, "condition_on_previous_text": false, "pad_with_silence": true}``;
    ``transcribe`` and the command line use these where the caller did not choose, so the toy
    decodes the same whether it is loaded as ``"toy"`` or by its path, and ``transcribe`` pads a
    recording's last window as the lens pads a clip (``longform.window_mel``). Whisper's own models
    carry none: their last window's mel is padded with zeros, as openai-whisper's ``transcribe`` does.
    """
    path = folder / "config.json"
    if not path.is_file():
        return {}
    found = read_json_object(path).get(DEFAULTS_KEY, {})
    if not isinstance(found, dict) or any(
        not isinstance(found.get(k), t) for k, t in DEFAULT_KINDS.items() if k in found
    ):
        raise CheckpointError(f"{path}: {DEFAULTS_KEY} must map some of {', '.join(DEFAULT_KINDS)} to true or false")
    unknown = sorted(set(found) - set(DEFAULT_KINDS))
    if unknown:
        raise CheckpointError(f"{path}: {DEFAULTS_KEY} has {', '.join(unknown)}; a model may carry only "
                              f"{', '.join(DEFAULT_KINDS)}")  # fmt: skip
    return dict(found)


def read_generation_heads(folder: Path, dims: ModelDims) -> list[tuple[int, int]] | None:
    """The ``alignment_heads`` of a hub folder's ``generation_config.json``, checked against ``dims``."""
    from .ct2 import alignment_heads_of

    path = folder / "generation_config.json"
    if not path.is_file():
        return None
    return alignment_heads_of(read_json_object(path).get("alignment_heads"), dims, path)


# ----------------------------------------------------------------------------- readers


def read_hf_folder(folder: Path) -> tuple[ModelDims, dict[str, Tensor]]:
    """Dims and OpenAI-keyed weights of a directory in the hub's layout."""
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for p in (config_path, weights_path):
        if not p.exists():
            raise CheckpointError(f"{folder} is not a Whisper model directory: {p.name} is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
    if (folder / "model.bin").is_file() and isinstance(config, dict) and "num_mel_bins" not in config:
        raise CheckpointError(
            f"{folder} holds both model.bin (CTranslate2) and model.safetensors, and its config.json is "
            "CTranslate2's: keep one layout per folder (move model.safetensors, or model.bin, away)"
        )
    dims = dims_from_hf_config(config, config_path)
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
    """Dims and weights of an OpenAI checkpoint ``{"dims": {...}, "model_state_dict": {...}}``.

    Weights only (``torch.load(weights_only=True)``: no code in the file runs), memory-mapped when the
    file is in torch's zip format (every torch since 1.6 writes it), else read whole.
    """
    zipped = zipfile.is_zipfile(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if not zipped and not head.startswith(b"\x80"):  # torch's zip format, or a pickle of protocol 2 or later
        shown = head[:24].decode("utf-8", "replace").split("\n")[0]
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it starts with {shown!r}): give an OpenAI .pt "
                              "file, a model folder, or a model name")  # fmt: skip
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:  # weights_only refused an object: say which, in one line
        reason = re.search(r"[^\n]*(?:GLOBAL|global)[^\n]*", str(e))
        said = reason[0].split(". Please use")[0].strip() if reason else "it is not a pickle of tensors"
        raise CheckpointError(
            f"{path} holds Python objects, not only weights, and whisper_lens loads weights only "
            f"(no code from a checkpoint runs): {said}"
        ) from None
    except Exception as e:  # torch raises many kinds here (zip, pickle, runtime) for a file that is not a checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {type(e).__name__}: {first}") from None
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is not an OpenAI Whisper checkpoint (want a dict with 'dims' and 'model_state_dict')"
        )
    names = {f.name for f in fields(ModelDims)}
    raw, state = checkpoint["dims"], checkpoint["model_state_dict"]
    if not isinstance(raw, dict) or set(raw) != names:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path}: 'dims' must have the fields {sorted(names)}, got {got}")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'model_state_dict' must map names to tensors")
    try:
        return ModelDims(**raw), dict(state)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def build(dims: ModelDims, state: Mapping[str, Tensor], source: Path | str = "checkpoint") -> Whisper:
    """A model of ``dims`` holding ``state``, after checking every key and shape against the architecture."""
    with torch.device("meta"):
        model = Whisper(dims)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    if missing:
        raise CheckpointError(f"{source} is missing {len(missing)} key(s): {', '.join(missing[:5])}")
    if unexpected:
        raise CheckpointError(f"{source} has {len(unexpected)} unexpected key(s): {', '.join(unexpected[:5])}")
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(
                f"{source}: shape mismatch for {k}: checkpoint has {tuple(state[k].shape)}, model wants {shape} "
                "(its config contradicts its weights?)"
            )
        if not state[k].is_floating_point():
            raise CheckpointError(f"{source}: {k} is stored as {state[k].dtype}, not as floating-point numbers")
        if not torch.isfinite(state[k]).all():  # every output would be NaN, blamed on the audio
            raise CheckpointError(f"{source}: the weight {k} holds NaN or infinite values (a corrupt or diverged "
                                  "checkpoint)")  # fmt: skip
    model.load_state_dict(dict(state), strict=True, assign=True)
    return model


def _find_tokenizer(tokenizer, folder: Path, dims: ModelDims):
    """The tokenizer given, or the one beside the weights (one *.tiktoken file, or vocab.json, tokenizer.json,
    vocabulary.json, vocabulary.txt in that order), or OpenAI's for ``n_vocab`` (51864: English-only,
    51865 / 51866: multilingual), or None for any other vocabulary."""
    from .tokenizer import VOCABULARY_FILES, Tokenizer, load_tokenizer

    if isinstance(tokenizer, Tokenizer):
        if tokenizer.n_vocab != dims.n_vocab:
            raise ValueError(f"tokenizer has n_vocab {tokenizer.n_vocab}, the model {dims.n_vocab}")
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer, n_vocab=dims.n_vocab)
    ranks = sorted(folder.glob("*.tiktoken"))
    if len(ranks) == 1:
        return load_tokenizer(ranks[0], n_vocab=dims.n_vocab)
    if len(ranks) > 1:
        raise CheckpointError(
            f"{folder} holds {len(ranks)} tokenizer files ({', '.join(r.name for r in ranks[:3])}): keep one beside "
            "the weights, or choose one with tokenizer=PATH"
        )
    beside = [folder / name for name in VOCABULARY_FILES if (folder / name).is_file()]
    if beside:
        try:
            return load_tokenizer(beside[0], n_vocab=dims.n_vocab)
        except ValueError as e:
            raise CheckpointError(f"the tokenizer beside the weights is unusable: {e}; pass tokenizer=...") from None
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
    if getattr(model, "transcribe_defaults", None):
        config[DEFAULTS_KEY] = dict(model.transcribe_defaults)
    state = {openai_to_hf(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
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


def download(name: str, download_root: str | os.PathLike | None = None) -> Path:
    """Fetch an official model, a distil-whisper model (or a hub id) into the hub cache; return its local folder."""
    if name in SHIPPED:
        return SHIPPED[name]
    name = ALIASES.get(name, name)
    repo = OFFICIAL[name][0] if name in OFFICIAL else DISTIL[name][0] if name in DISTIL else name
    if repo == name and not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise CheckpointError(f"unknown model {name!r}; names: {', '.join(NAMES)}")
    return fetch(repo, download_root)


def default_model() -> str:
    """The model a real-speech command uses when none is named: a real one already on disk, else a one-line error.

    openai-whisper's default, turbo, first; then the others from the smallest. Nothing is downloaded.
    """
    for name in ["turbo", *OFFICIAL]:
        try:
            find_official(name, local=True)
        except CheckpointError:
            continue
        return name
    raise CheckpointError("no model given and no Whisper model found on disk: pass --model NAME (tiny.en, base, "
                          "turbo, ... are downloaded once; see `whisper-lens download`) or a folder or .pt file; "
                          "--model toy runs the shipped toy model, which does not know real speech")  # fmt: skip
