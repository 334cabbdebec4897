"""faster-whisper's model folders (CTranslate2 format), read without CTranslate2.

faster-whisper runs Whisper on CTranslate2, and ``Systran/faster-whisper-*`` on the hub is the
most downloaded form of Whisper. Such a folder holds ``model.bin`` (every weight), ``config.json``
(alignment heads, suppressed tokens, language ids) and the tokenizer (``tokenizer.json``,
``vocabulary.txt``).

``model.bin`` (format version 6) is little-endian binary::

    u32 version | string spec name | u32 spec revision | u32 n_variables
    n_variables x (string name | u8 rank | rank x u32 dims | u8 dtype | u32 n_bytes | n_bytes of data)
    u32 n_aliases | n_aliases x (string alias | string name it stands for)

where a string is a u16 length (counting a final NUL byte), the UTF-8 bytes and the NUL. The
dtype is an index into (float32, int8, int16, int32, float16, bfloat16). A quantised weight
``.../weight`` (int8 or int16) comes with ``.../weight_scale``: the real weight is
``weight / weight_scale`` (one scale per output row for int8, one number for int16).

CTranslate2 names the layers by role (``encoder/layer_0/self_attention/linear_0``) and fuses
projections: self-attention's query, key and value are one (3D, D) matrix, cross-attention's key
and value one (2D, D) matrix; the key has no bias in Whisper, so its third of the fused bias is
zero. ``read_ct2_folder`` splits them back into OpenAI's state-dict keys, so the model loads like
any other checkpoint.

``config.json`` holds ids, not weights: ``alignment_heads`` (the cross-attention heads that
track time, used for word timestamps) becomes ``model.alignment_heads``; ``suppress_ids``,
``suppress_ids_begin`` and ``lang_ids`` are checked against the vocabulary, so that a config
written for another model is refused rather than trusted.
"""

from __future__ import annotations

import mmap
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .loading import CheckpointError, read_json_object
from .model import ModelDims

FORMAT_VERSION = 6
SPEC_NAME = "WhisperSpec"
DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)


@dataclass
class Ct2Model:
    """What a CTranslate2 Whisper folder holds, in OpenAI's terms."""

    dims: ModelDims
    state: dict[str, Tensor]  # OpenAI's state-dict keys, the stored dtype (quantised weights dequantised to fp32)
    config: dict = field(default_factory=dict)  # config.json: alignment_heads, suppress_ids, lang_ids, ...
    stored_dtype: str = "float32"  # the token embedding's: float16 for faster-whisper's models, int8, ...
    alignment_heads: list[tuple[int, int]] | None = None  # config.json's, checked against dims


def is_ct2_folder(folder: Path) -> bool:
    """A CTranslate2 model folder: it has ``model.bin`` (and the HF layout's ``model.safetensors`` is absent)."""
    return (folder / "model.bin").is_file() and not (folder / "model.safetensors").exists()


# ----------------------------------------------------------------------------- model.bin


class _Reader:
    """Sequential little-endian reads over a memory-mapped file, each bounds-checked."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise CheckpointError(f"{path} is empty")
            # a private copy-on-write map: tensors can view it, and writing to them never touches the file
            self.buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.offset = 0

    def take(self, n: int) -> int:
        """Advance by ``n`` bytes; return where they start."""
        start = self.offset
        if start + n > len(self.buffer):
            raise CheckpointError(f"{self.path} is truncated: it ends at byte {len(self.buffer)}, inside a record")
        self.offset += n
        return start

    def unpack(self, fmt: str) -> int:
        return struct.unpack_from("<" + fmt, self.buffer, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("H")
        raw = self.buffer[self.take(n) : self.offset]
        if n == 0 or raw[-1] != 0:
            raise CheckpointError(f"{self.path} is corrupt: a name at byte {self.offset - n} is not NUL-terminated")
        return raw[:-1].decode("utf-8", errors="replace")

    def tensor(self, shape: list[int], dtype: torch.dtype, n_bytes: int) -> Tensor:
        start = self.take(n_bytes)
        count = n_bytes // dtype.itemsize
        with warnings.catch_warnings():  # torch warns about buffers it cannot prove writable
            warnings.simplefilter("ignore")
            x = torch.frombuffer(self.buffer, dtype=dtype, count=count, offset=start) if count else torch.empty(0)
        if start % 64:  # keep every weight aligned for vectorised kernels
            x = x.clone()
        return x.view(shape) if count else torch.empty(shape, dtype=dtype)


def read_model_bin(path: Path) -> tuple[str, int, dict[str, Tensor]]:
    """(spec name, spec revision, variables by name) of a CTranslate2 ``model.bin``; aliases are resolved."""
    r = _Reader(path)
    version = r.unpack("I")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has CTranslate2 format version {version}; this reader knows version {FORMAT_VERSION} "
            "(re-convert the model with a current ct2-transformers-converter)"
        )
    spec, revision, n = r.string(), r.unpack("I"), r.unpack("I")
    variables: dict[str, Tensor] = {}
    for _ in range(n):
        name, rank = r.string(), r.unpack("B")
        shape = [r.unpack("I") for _ in range(rank)]
        code, n_bytes = r.unpack("B"), r.unpack("I")
        if code >= len(DTYPES):
            raise CheckpointError(f"{path}: variable {name!r} has an unknown dtype code {code}")
        dtype = DTYPES[code]
        if n_bytes != dtype.itemsize * _numel(shape):
            raise CheckpointError(f"{path}: variable {name!r} of shape {shape} and {dtype} has {n_bytes} bytes")
        variables[name] = r.tensor(shape, dtype, n_bytes)
    for _ in range(r.unpack("I")):
        alias, target = r.string(), r.string()
        if target not in variables:
            raise CheckpointError(f"{path}: alias {alias!r} names {target!r}, which the file does not hold")
        variables[alias] = variables[target]
    if r.offset != len(r.buffer):
        raise CheckpointError(f"{path} has {len(r.buffer) - r.offset} bytes after its last record (corrupt?)")
    return spec, revision, variables


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------- CTranslate2 names -> OpenAI's


def _layer_count(variables: dict[str, Tensor], stack: str) -> int:
    n = 0
    while f"{stack}/layer_{n}/ffn/linear_0/weight" in variables:
        n += 1
    return n


def _scalar(variables: dict[str, Tensor], name: str, path: Path) -> int:
    if name not in variables or variables[name].numel() != 1:
        raise CheckpointError(f"{path} lacks {name!r}: not a CTranslate2 Whisper model")
    return int(variables[name].item())


def ct2_dims(variables: dict[str, Tensor], path: Path) -> ModelDims:
    """The model's shape, read from its weights and head counts."""
    try:
        conv1 = variables["encoder/conv1/weight"]  # (D, n_mels, 3)
        return ModelDims(
            n_mels=conv1.shape[1],
            n_audio_ctx=variables["encoder/position_encodings/encodings"].shape[0],
            n_audio_state=conv1.shape[0],
            n_audio_head=_scalar(variables, "encoder/num_heads", path),
            n_audio_layer=_layer_count(variables, "encoder"),
            n_vocab=variables["decoder/embeddings/weight"].shape[0],
            n_text_ctx=variables["decoder/position_encodings/encodings"].shape[0],
            n_text_state=variables["decoder/embeddings/weight"].shape[1],
            n_text_head=_scalar(variables, "decoder/num_heads", path),
            n_text_layer=_layer_count(variables, "decoder"),
        )
    except KeyError as e:
        raise CheckpointError(f"{path} lacks {e.args[0]!r}: not a CTranslate2 Whisper model") from None
    except ValueError as e:  # ModelDims' own checks
        raise CheckpointError(f"{path}: {e}") from None


def _weight(variables: dict[str, Tensor], name: str, path: Path) -> Tensor:
    """A weight as stored, or dequantised to fp32 when it is stored as integers with a ``_scale``.

    int8 has one scale per output row (a conv's row is its output channel), int16 one for the
    whole matrix; the converter stored ``rint(w * scale)``, so ``w`` is ``stored / scale``.
    """
    w = variables[name]
    scale = variables.get(name + "_scale")
    if w.is_floating_point():
        return w
    if scale is None:
        stored = str(w.dtype).removeprefix("torch.")
        raise CheckpointError(f"{path}: {name} is stored as {stored} without {name}_scale: it cannot be dequantised")
    if scale.dim() == 0:  # int16: one scale
        return w.float() / scale.float()
    if scale.shape != w.shape[:1]:
        raise CheckpointError(f"{path}: {name}_scale has shape {list(scale.shape)}, {name} has {w.shape[0]} rows")
    return w.float() / scale.float().view(-1, *[1] * (w.dim() - 1))  # (rows, 1[, 1]) broadcast over each row


def _linear(variables: dict[str, Tensor], ct2: str, parts: list[str], out: dict[str, Tensor], path: Path) -> None:
    """Split a (possibly fused) CTranslate2 linear into OpenAI's projections ``parts``."""
    w = _weight(variables, f"{ct2}/weight", path)  # (k * D, D)
    b = variables.get(f"{ct2}/bias")  # (k * D,)
    ws, bs = w.chunk(len(parts)), (b.chunk(len(parts)) if b is not None else [None] * len(parts))
    for part, wp, bp in zip(parts, ws, bs, strict=True):
        out[f"{part}.weight"] = wp
        if part.endswith(".key"):  # Whisper's keys have no bias: the converter wrote zeros there
            if bp is not None and bool(bp.ne(0).any()):
                raise CheckpointError(f"{path}: {ct2}/bias is not zero where the key's would be: not a Whisper model")
        elif bp is not None:
            out[f"{part}.bias"] = bp


def _layer_norm(variables: dict[str, Tensor], ct2: str, ours: str, out: dict[str, Tensor]) -> None:
    out[f"{ours}.weight"], out[f"{ours}.bias"] = variables[f"{ct2}/gamma"], variables[f"{ct2}/beta"]


def _blocks(dims: ModelDims) -> Iterator[tuple[str, str, bool]]:
    """(CTranslate2 scope, OpenAI scope, has cross-attention) of every block."""
    for i in range(dims.n_audio_layer):
        yield f"encoder/layer_{i}", f"encoder.blocks.{i}", False
    for i in range(dims.n_text_layer):
        yield f"decoder/layer_{i}", f"decoder.blocks.{i}", True


def ct2_to_openai(variables: dict[str, Tensor], dims: ModelDims, path: Path) -> dict[str, Tensor]:
    """OpenAI's state dict from CTranslate2's variables (fused projections split, quantised weights dequantised)."""
    out: dict[str, Tensor] = {}
    try:
        for conv in ("conv1", "conv2"):
            out[f"encoder.{conv}.weight"] = _weight(variables, f"encoder/{conv}/weight", path)
            out[f"encoder.{conv}.bias"] = variables[f"encoder/{conv}/bias"]
        out["encoder.positional_embedding"] = variables["encoder/position_encodings/encodings"]
        _layer_norm(variables, "encoder/layer_norm", "encoder.ln_post", out)
        out["decoder.token_embedding.weight"] = _weight(variables, "decoder/embeddings/weight", path)
        out["decoder.positional_embedding"] = variables["decoder/position_encodings/encodings"]
        _layer_norm(variables, "decoder/layer_norm", "decoder.ln", out)
        for ct2, ours, cross in _blocks(dims):
            _layer_norm(variables, f"{ct2}/self_attention/layer_norm", f"{ours}.attn_ln", out)
            qkv = [f"{ours}.attn.query", f"{ours}.attn.key", f"{ours}.attn.value"]
            _linear(variables, f"{ct2}/self_attention/linear_0", qkv, out, path)
            _linear(variables, f"{ct2}/self_attention/linear_1", [f"{ours}.attn.out"], out, path)
            if cross:
                _layer_norm(variables, f"{ct2}/attention/layer_norm", f"{ours}.cross_attn_ln", out)
                _linear(variables, f"{ct2}/attention/linear_0", [f"{ours}.cross_attn.query"], out, path)
                kv = [f"{ours}.cross_attn.key", f"{ours}.cross_attn.value"]
                _linear(variables, f"{ct2}/attention/linear_1", kv, out, path)
                _linear(variables, f"{ct2}/attention/linear_2", [f"{ours}.cross_attn.out"], out, path)
            _layer_norm(variables, f"{ct2}/ffn/layer_norm", f"{ours}.mlp_ln", out)
            _linear(variables, f"{ct2}/ffn/linear_0", [f"{ours}.mlp.0"], out, path)
            _linear(variables, f"{ct2}/ffn/linear_1", [f"{ours}.mlp.2"], out, path)
    except KeyError as e:
        raise CheckpointError(f"{path} lacks {e.args[0]!r}: not a CTranslate2 Whisper model") from None
    _check_tied_projection(variables, path)
    return out


def _check_tied_projection(variables: dict[str, Tensor], path: Path) -> None:
    """Whisper's logits use the token embedding; a separate output projection must be the same matrix."""
    embedding, projection = variables["decoder/embeddings/weight"], variables.get("decoder/projection/weight")
    if projection is None or projection is embedding:  # absent, or an alias (what the converter writes)
        return
    if projection.shape != embedding.shape or not torch.equal(projection, embedding):
        raise CheckpointError(
            f"{path}: decoder/projection/weight differs from decoder/embeddings/weight; Whisper ties them, "
            "so this model cannot be represented here"
        )


# ----------------------------------------------------------------------------- config.json


def read_ct2_config(path: Path, dims: ModelDims) -> tuple[dict, list[tuple[int, int]] | None]:
    """config.json beside ``model.bin`` and its alignment heads, each id checked against the model's shape."""
    if not path.exists():
        return {}, None
    config = read_json_object(path)
    for key in ("suppress_ids", "suppress_ids_begin", "lang_ids"):
        ids = config.get(key) or []
        if not isinstance(ids, list) or not all(type(i) is int and 0 <= i < dims.n_vocab for i in ids):
            raise CheckpointError(
                f"{path}: {key} must be token ids below the model's n_vocab {dims.n_vocab}: it contradicts the weights"
            )
    return config, alignment_heads_of(config.get("alignment_heads"), dims, path)


def alignment_heads_of(pairs, dims: ModelDims, path: Path) -> list[tuple[int, int]] | None:
    """``[[layer, head], ...]`` as a list of tuples, each inside the decoder's layers and heads (None stays None)."""
    if pairs is None:
        return None
    ok = isinstance(pairs, list) and all(
        isinstance(p, list | tuple) and len(p) == 2 and all(type(i) is int for i in p) for p in pairs
    )
    if not ok:
        raise CheckpointError(f"{path}: alignment_heads must be a list of [layer, head] pairs")
    outside = [(layer, head) for layer, head in pairs
               if not (0 <= layer < dims.n_text_layer and 0 <= head < dims.n_text_head)]  # fmt: skip
    if outside:
        raise CheckpointError(
            f"{path}: alignment head {list(outside[0])} is outside the decoder's {dims.n_text_layer} layers x "
            f"{dims.n_text_head} heads: it contradicts the weights"
        )
    return [(layer, head) for layer, head in pairs]


def read_ct2_folder(folder: Path) -> Ct2Model:
    """Dims, OpenAI-keyed weights and config of a CTranslate2 Whisper folder (faster-whisper's format)."""
    path = folder / "model.bin"
    spec, _revision, variables = read_model_bin(path)
    if spec != SPEC_NAME:
        raise CheckpointError(f"{path} is a CTranslate2 {spec!r} model, not Whisper ({SPEC_NAME!r})")
    dims = ct2_dims(variables, path)
    state = ct2_to_openai(variables, dims, path)
    config, heads = read_ct2_config(folder / "config.json", dims)
    stored = variables["decoder/embeddings/weight"].dtype
    return Ct2Model(dims, state, config, str(stored).removeprefix("torch."), heads)
