"""Load GGUF files (llama.cpp's format) into an evolm ``Transformer`` and ``Tokenizer``.

A GGUF file is one header of typed key/value metadata (the model's hyper-parameters under
``{arch}.*``, the tokenizer under ``tokenizer.*``) followed by tensors, most of them quantized in
blocks (Q4_0 ... Q8_0, the K-quants Q4_K/Q5_K/Q6_K; see llama.cpp's ``ggml-quants.c``).

Loading is three steps:
1. ``read_metadata``: parse the header ourselves (a few hundred lines of struct reads; the
   ``gguf`` package's reader builds one numpy view per vocabulary entry and takes ~30 s on a
   262k-token vocabulary, this takes well under one).
2. ``config_from_metadata``: map ``{arch}.*`` keys to a ``ModelConfig``: the keys every
   architecture shares here, the rest by the family registered for the architecture
   (``interop/families/``: llama / mistral / mixtral, qwen2, qwen3, qwen3moe, gemma2, gemma3,
   olmo2, deepseek2, gpt2, falcon, mamba), which also fills in what llama.cpp hard-codes rather than stores (Gemma 3's
   local RoPE base, its 5:1 local/global pattern, ...).
3. ``load_gguf``: dequantize every tensor (``gguf.quants.dequantize``, with torch fast paths for
   the float and Q8_0 types), undo what llama.cpp's converter did to the Hugging Face weights,
   rename to our parameter names and assign into a model built without allocating weights:
   * Llama-architecture Q/K rows are permuted by the converter so that llama.cpp's interleaved
     ("GPT-J") RoPE computes the same as Hugging Face's rotate-half RoPE: we permute them back.
   * Gemma's RMSNorm weights are stored as ``1 + w``: we subtract one (our ``norm_unit_offset``
     stores ``w``, as Hugging Face does).
   * A file without ``output.weight`` ties the LM head to the embeddings.
   * Mamba's ``ssm_a`` holds ``A = -exp(A_log)`` and ``ssm_conv1d`` squeezed filters: we take the
     log back and restore the filters' axis.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evolm.config import ConfigError, ModelConfig
from evolm.inputs import first_line, short
from evolm.interop.empty import WeightsError, assign_weights, build_empty, check_layers
from evolm.interop.families import GGUF_FAMILIES
from evolm.interop.gguf_blocks import blocks_from_raw
from evolm.interop.gguf_vocab import file_cache_key, tokenizer_from_gguf_metadata
from evolm.quant.blocks import Blocks, rebuilds
from evolm.tokenizer import TokenizerError

SUPPORTED_ARCHS = tuple(GGUF_FAMILIES)


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded; the message names the file and the field or tensor."""


# ----------------------------------------------------------------------------------------------
# 1. reading the file
# ----------------------------------------------------------------------------------------------
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
# Smallest encodings, to refuse a count the rest of the file cannot hold before looping on it:
# a key/value (key length, type, one byte of value), a tensor info (name length, n_dims, type,
# offset), one array element of each kind.
_MIN_KV, _MIN_TENSOR_INFO, _MIN_STRING, _MIN_ARRAY = 8 + 4 + 1, 8 + 4 + 4 + 8, 8, 4 + 8
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2  # arrays of arrays exist in the format; nothing we read nests deeper


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy / torch order (rows first): GGUF's dims reversed
    ggml_type: int
    offset: int  # absolute offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: file is truncated (wanted {n} bytes at offset {self.pos})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def count(self, n: int, min_size: int, what: str) -> int:
        """A count read from the file, refused if the rest of the file cannot hold that many items."""
        left = len(self.buf) - self.pos
        if n * min_size > left:
            raise GGUFError(f"{self.path}: {what} is {n}, but the {left} bytes left in the file hold at most "
                            f"{left // min_size} (damaged header?)")
        return n

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def _strings(self, n: int, keep: bool = True) -> list[str]:
        """``n`` length-prefixed strings (``keep=False``: only skipped past), bounds-checked."""
        buf, pos, end, unpack, out = self.buf, self.pos, len(self.buf), struct.Struct("<Q").unpack_from, []
        for _ in range(n):  # tight loop: vocabularies have 250k+ entries
            if pos + 8 > end or pos + 8 + (k := unpack(buf, pos)[0]) > end:
                raise GGUFError(f"{self.path}: file is truncated inside a string array (offset {pos})")
            if keep:
                out.append(str(buf[pos + 8:pos + 8 + k], "utf-8", "replace"))
            pos += 8 + k
        self.pos = pos
        return out

    def value(self, vtype: int, key: str, skip_big: bool, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GGUFError(f"{self.path}: metadata key {short(key)} nests arrays deeper than {MAX_ARRAY_DEPTH}")
            itype, n = self.scalar("<I"), self.scalar("<Q")
            if itype in _NUMPY:
                arr = np.frombuffer(self.take(n * np.dtype(_NUMPY[itype]).itemsize), dtype=_NUMPY[itype])
                return arr.tolist()
            if itype == _STRING:
                self.count(n, _MIN_STRING, f"the length of string array {short(key)}")
                if skip_big:  # skip past without decoding: only the length is kept
                    self._strings(n, keep=False)
                    return _Skipped(n)
                return self._strings(n)
            if itype == _ARRAY:
                self.count(n, _MIN_ARRAY, f"the length of array {short(key)}")
                return [self.value(itype, key, skip_big, depth + 1) for _ in range(n)]
            raise GGUFError(f"{self.path}: metadata key {short(key)} is an array of unknown value type {itype}")
        raise GGUFError(f"{self.path}: metadata key {short(key)} has unknown value type {vtype}")


@dataclass
class _Skipped:
    """A large array left unread (``read_metadata(tokenizer=False)``); ``n`` is its length."""
    n: int

    def __len__(self) -> int:
        return self.n


class GGUFFile:
    """A parsed GGUF header: ``metadata`` (dict) and ``tensors`` (name -> TensorInfo)."""

    def __init__(self, path: str | os.PathLike, tokenizer: bool = True):
        self.path = str(path)
        if not Path(self.path).is_file():
            raise GGUFError(f"{self.path}: no such GGUF file")
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self._mm), self.path)
        magic = bytes(cur.take(4))
        if magic != b"GGUF":
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {version} is not supported (need 2 or 3; "
                            f"a huge number means a big-endian file)")
        n_tensors = cur.count(cur.scalar("<Q"), _MIN_TENSOR_INFO, "the tensor count")
        n_kv = cur.count(cur.scalar("<Q"), _MIN_KV, "the metadata key count")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.scalar("<I")
            skip = not tokenizer and key.startswith("tokenizer.ggml.")
            self.metadata[key] = cur.value(vtype, key, skip)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions; expected 1 to {MAX_DIMS}")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            ggml_type, offset = cur.scalar("<I"), cur.scalar("<Q")
            infos.append((name, dims, ggml_type, offset))
        align = self.metadata.get("general.alignment", 32)
        if not (isinstance(align, int) and 1 <= align <= 2**20):
            raise GGUFError(f"{self.path}: metadata 'general.alignment' is {short(align)}; expected an integer "
                            f"from 1 to {2**20} (32 by default)")
        data_start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, ggml_type, offset in infos:
            nbytes = _tensor_nbytes(dims, ggml_type, name, self.path)
            start = data_start + offset
            if start + nbytes > len(self._mm):
                raise GGUFError(f"{self.path}: tensor {name!r} runs past the end of the file (truncated download?)")
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), ggml_type, start, nbytes)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if arch is None:
            raise GGUFError(f"{self.path}: metadata has no 'general.architecture'")
        return arch

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as uint8, shaped (*rows, bytes_per_row)."""
        t = self.tensors[name]
        rows = t.shape[:-1]
        data = self._mm[t.offset:t.offset + t.nbytes]
        return data.reshape(*rows, -1) if rows else data

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize one tensor to ``dtype`` (values computed in float32)."""
        t = self.tensors[name]
        return dequantize(self.raw(name), t.ggml_type, t.shape, name=f"{self.path}: tensor {name!r}").to(dtype)


def _ggml_type_name(ggml_type: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


# (values per block, bytes per block) of the float types; the kept block types are in gguf_blocks:
# the types of the files evolm loads by default are known without importing the gguf package
_F32, _F16, _Q8_0, _BF16 = 0, 1, 8, 30  # gguf.GGMLQuantizationType values
_FLOAT_SIZES = {_F32: (1, 4), _F16: (1, 2), _BF16: (1, 2)}


def _quant_size(ggml_type: int) -> tuple[int, int] | None:
    """``(values per block, bytes per block)`` of ggml type ``ggml_type``, or None if unknown."""
    from evolm.interop.gguf_blocks import block_size

    known = _FLOAT_SIZES.get(ggml_type) or block_size(ggml_type)
    if known:
        return known
    import gguf

    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None


def _tensor_nbytes(dims: list[int], ggml_type: int, name: str, path: str) -> int:
    sizes = _quant_size(ggml_type)
    if sizes is None:
        raise GGUFError(f"{path}: tensor {name!r} has unknown ggml type {ggml_type}")
    block, size = sizes
    n = math.prod(dims)  # Python integers: dims are 64-bit, their product must not wrap around
    if dims and dims[0] % block:
        raise GGUFError(f"{path}: tensor {name!r} row length {dims[0]} is not a multiple of the "
                        f"{_ggml_type_name(ggml_type)} block size {block}")
    return n // block * size


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], name: str = "tensor") -> torch.Tensor:
    """Bytes of one GGUF tensor -> float32 torch tensor of ``shape``.

    F32/F16/BF16 and Q8_0 (llama.cpp's usual embedding type) are decoded with torch, the rest
    with the ``gguf`` package's numpy reference (``gguf.quants.dequantize``).
    """
    with warnings.catch_warnings():  # a read-only view of the mapped file: we never write to it
        warnings.simplefilter("ignore", UserWarning)
        buf = torch.frombuffer(memoryview(np.ascontiguousarray(raw).reshape(-1)), dtype=torch.uint8) \
            if raw.size else torch.empty(0, dtype=torch.uint8)
    if ggml_type == _F32:
        return buf.view(torch.float32).reshape(shape).clone()
    if ggml_type == _F16:
        return buf.view(torch.float16).reshape(shape).float()
    if ggml_type == _BF16:
        return buf.view(torch.bfloat16).reshape(shape).float()
    if ggml_type == _Q8_0:  # blocks of 32: one f16 scale, 32 int8
        blocks = buf.view(-1, 34)
        scale = blocks[:, :2].contiguous().view(torch.float16).float()
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
        return q.mul_(scale).reshape(shape)
    import gguf  # the numpy reference: ~0.1 s to import, so only for the types torch does not decode here

    try:
        out = gguf.quants.dequantize(np.asarray(raw), gguf.GGMLQuantizationType(ggml_type))
    except (NotImplementedError, ValueError) as e:
        raise GGUFError(f"{name}: ggml type {_ggml_type_name(ggml_type)} cannot be dequantized ({e})") from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


def read_metadata(path_or_file: Any, tokenizer: bool = True) -> dict[str, Any]:
    """The metadata dict of a GGUF path or an already opened ``GGUFFile`` / ``gguf.GGUFReader``."""
    if isinstance(path_or_file, GGUFFile):
        return path_or_file.metadata
    if hasattr(path_or_file, "fields"):  # a gguf.GGUFReader
        return {k: f.contents() for k, f in path_or_file.fields.items() if not k.startswith("GGUF.")}
    return GGUFFile(path_or_file, tokenizer=tokenizer).metadata


# ----------------------------------------------------------------------------------------------
# 2. metadata -> ModelConfig
# ----------------------------------------------------------------------------------------------
def _uniform(value: Any, key: str, path: str) -> Any:
    """Per-layer arrays (some files store head counts per layer) must be uniform for us."""
    if isinstance(value, list):
        if not value or any(isinstance(v, list) for v in value) or len(set(value)) != 1:
            raise GGUFError(f"{path}: metadata {key!r} varies per layer ({value[:8]}...); "
                            f"per-layer sizes are not supported")
        return value[0]
    return value


def _family(arch: str | None, path: str):
    """The family that reads GGUF architecture ``arch`` (``families/<family>.py``: ``gguf_archs``)."""
    if not isinstance(arch, str) or arch not in GGUF_FAMILIES:
        raise GGUFError(f"{path}: GGUF architecture {short(arch)} is not supported; supported: {list(SUPPORTED_ARCHS)}")
    return GGUF_FAMILIES[arch]


def config_from_metadata(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                         path: str = "gguf") -> ModelConfig:
    """A ``ModelConfig`` for the model a GGUF file describes.

    The keys every llama.cpp architecture shares are read here; the family registered for the
    architecture (``families.GGUF_FAMILIES``) sets its switches and reads its own keys.
    """
    arch = meta.get("general.architecture")
    fam = _family(arch, path)
    try:
        return _config_from_metadata(meta, tensor_shapes, path, arch, fam)
    except GGUFError:
        raise
    except ConfigError as e:
        raise GGUFError(f"{path}: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, OverflowError, AttributeError) as e:
        # a family's own key of an unexpected type: still one line naming the file
        raise GGUFError(f"{path}: the {arch!r} metadata cannot be read as a model config "
                        f"({type(e).__name__}: {first_line(e)})") from None


def _config_from_metadata(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]], path: str,
                          arch: str, fam) -> ModelConfig:
    def get(key: str, default: Any = KeyError, kind: type | None = None) -> Any:
        """``{arch}.key``; ``kind=int``: a positive integer, ``kind=float``: a finite positive number."""
        full = f"{arch}.{key}"
        if full not in meta:
            if default is KeyError:
                raise GGUFError(f"{path}: metadata key {full!r} is missing (needed for architecture {arch!r})")
            return default
        v = _uniform(meta[full], full, path)
        ok = (kind is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                               and (kind is float or isinstance(v, int))))
        if not ok:
            want = "a positive integer" if kind is int else "a finite positive number"
            raise GGUFError(f"{path}: metadata {full!r} is {short(v)}; expected {want}")
        return v

    names = set(tensor_shapes)
    if "token_embd.weight" not in tensor_shapes:
        raise GGUFError(f"{path}: tensor 'token_embd.weight' is missing")
    if len(tensor_shapes["token_embd.weight"]) != 2:
        raise GGUFError(f"{path}: tensor 'token_embd.weight' has shape {tensor_shapes['token_embd.weight']}; "
                        f"expected (vocab, width)")
    vocab_size, d_model = tensor_shapes["token_embd.weight"]
    ssm = fam.attention == "mamba"  # llama.cpp's mamba states 0 heads and no MLP (its family reads the rest)
    n_heads = 1 if ssm else get("attention.head_count", kind=int)
    c: dict[str, Any] = dict(
        name=str(meta.get("general.name") or Path(path).stem)[:200],
        vocab_size=vocab_size, d_model=get("embedding_length", kind=int), n_layers=get("block_count", kind=int),
        n_heads=n_heads, n_kv_heads=get("attention.head_count_kv", n_heads, kind=int),
        d_ff=None if ssm else get("feed_forward_length", None, kind=int),
        max_seq_len=get("context_length", 4096, kind=int),
        norm="rmsnorm", norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, kind=float), norm_bias=False,
        norm_placement=fam.norm_placement, qk_norm=fam.qk_norm,
        norm_unit_offset=fam.unit_offset_norms, embed_scale=fam.unit_offset_norms,
        pos_emb="rope", rope_theta=float(get("rope.freq_base", 10000.0, kind=float)),
        mlp="glu", activation="silu", mlp_bias=False,
        qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
        tie_embeddings="output.weight" not in names,
        meta={"source": "gguf", "gguf_architecture": arch, "file": str(path)},
    )
    if c["d_model"] != d_model:
        raise GGUFError(f"{path}: {arch}.embedding_length={c['d_model']} but token_embd.weight has width {d_model}")
    mla = fam.attention == "mla"  # MLA's head sizes are read by its family
    key_len = get("attention.key_length", None, kind=int)
    if key_len is not None and not mla:
        c["head_dim"] = key_len
    rope_dim = get("rope.dimension_count", None, kind=int)
    head_dim = c.get("head_dim") or c["d_model"] // n_heads
    if rope_dim and not mla and rope_dim != head_dim:  # partial rotary
        c["rotary_pct"] = rope_dim / head_dim
    if c["d_ff"] is None and not ssm:  # an all-MoE model states only the expert width
        c["d_ff"] = get("expert_feed_forward_length", kind=int)
    scaling = _rope_scaling(meta, arch, path)
    if scaling is not None:
        c["rope_scaling"] = scaling
    if fam.gguf_from_metadata:
        fam.gguf_from_metadata(get, meta, names, c)
    return ModelConfig(**c)


def _rope_scaling(meta: dict[str, Any], arch: str, path: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if kind in (None, "none") or (kind == "linear" and factor == 1.0):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"type": "yarn", "factor": factor,
               "original_max_seq_len": int(meta[f"{arch}.rope.scaling.original_context_length"])}
        log_mul = meta.get(f"{arch}.rope.scaling.yarn_log_multiplier")
        if log_mul:  # llama.cpp stores 0.1 * mscale_all_dim (DeepSeek)
            out["mscale"] = out["mscale_all_dim"] = float(log_mul) / 0.1
        return out
    raise GGUFError(f"{path}: {arch}.rope.scaling.type={short(kind)} is not supported (linear, yarn)")


# ----------------------------------------------------------------------------------------------
# 3. tensors -> state dict
# ----------------------------------------------------------------------------------------------
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate", "exp_probs_b": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
    # MLA
    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj",
    # Mamba (its A_log and D: ``_SSM_PARAMS``)
    "ssm_in": "self_attn.in_proj", "ssm_conv1d": "self_attn.conv1d", "ssm_x": "self_attn.x_proj",
    "ssm_dt": "self_attn.dt_proj", "ssm_out": "self_attn.out_proj",
}
# Mamba's two tensors named without a suffix: llama.cpp's converter stores A = -exp(A_log) as ``ssm_a``
_SSM_PARAMS = {"ssm_a": "self_attn.A_log", "ssm_d": "self_attn.D"}
_NORMS_BY_PLACEMENT = {  # GGUF norm tensor -> our norm module, per block wiring
    "pre": {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm"},
    "sandwich": {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm",
                 "post_attention_norm": "attn_out_norm", "post_ffw_norm": "mlp_out_norm"},
    "olmo2": {"post_attention_norm": "attn_out_norm", "post_ffw_norm": "mlp_out_norm"},
    "parallel": {"attn_norm": "attn_norm"},  # Falcon-7B: one norm feeds attention and MLP
    "parallel2": {"attn_norm_2": "attn_norm", "attn_norm": "mlp_norm"},  # Falcon-40B: attn_norm feeds the MLP
}


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (``convert_hf_to_gguf.py``'s ``permute``).

    Per head, the converter reorders the rows of a rotate-half (GPT-NeoX) projection
    ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` into interleaved pairs ``[x_0, y_0, x_1, y_1, ...]`` so that
    llama.cpp's pairwise RoPE gives the same attention; we restore the halves.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _our_name(name: str, norms: dict[str, str], path: str, arch: str) -> tuple[str, Any]:
    """Where a GGUF tensor goes: ``("param", our name)``, ``("expert", (layer, kind, expert or None))``
    or ``("split_kv", (layer, kind))`` (these two are assembled after every tensor is read), or
    ``("split_qkv", our name with {} for q/k/v)``."""
    parts = name.split(".")
    if name == "token_embd.weight":
        return "param", "embed_tokens.weight"
    if name == "output.weight":
        return "param", "lm_head.weight"
    if name == "position_embd.weight":  # GPT-2's learned positions
        return "param", "pos_embed.weight"
    if parts[0] == "output_norm":
        return "param", f"norm.{parts[1]}"
    if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit() and parts[2] in _SSM_PARAMS:
        return "param", f"layers.{parts[1]}.{_SSM_PARAMS[parts[2]]}"
    if parts[0] != "blk" or len(parts) < 4:
        raise GGUFError(f"{path}: tensor {name!r} is not understood for architecture {arch!r}")
    if not parts[1].isdigit():
        raise GGUFError(f"{path}: tensor {name!r}: {parts[1]!r} is not a layer number")
    i, kind, suffix = int(parts[1]), parts[2], parts[-1]
    prefix = f"layers.{i}."
    if len(parts) == 5 and kind in ("ffn_gate", "ffn_up", "ffn_down"):  # old per-expert Mixtral files
        return "expert", (i, kind + "_exps", int(parts[3]))
    if kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        return "expert", (i, kind, None)
    if kind in ("attn_k_b", "attn_v_b"):  # MLA: newer converters split kv_b
        return "split_kv", (i, kind)
    if kind == "attn_qkv":  # GPT-2's and Falcon's fused q|k|v rows
        return "split_qkv", prefix + "self_attn.{}_proj." + suffix
    if kind in norms:
        return "param", prefix + norms[kind] + "." + suffix
    if kind == "exp_probs_b":
        return "param", prefix + "mlp.gate.e_score_correction_bias"
    if kind not in _LAYER_NAMES:
        raise GGUFError(f"{path}: tensor {name!r} is not understood for architecture {arch!r}")
    return "param", prefix + _LAYER_NAMES[kind] + "." + suffix


def _verified_blocks(f: GGUFFile, name: str, sample_rows: int = 4,
                     memo: dict[str, str] | None = None) -> tuple[Blocks | None, str | None]:
    """A kept-type 2-D tensor's blocks, if their weights are the reference dequantization's, else
    ``(None, why)`` (``(None, None)``: a type that is not kept).

    With the C++ kernels (the code ``BlockLinear`` multiplies with) the first and last
    ``sample_rows`` rows are rebuilt and compared with the ``gguf`` package's numpy reference, bit
    for bit (every row of every type is in tests/test_blocks.py): the whole weight is never made
    float here, the slowest part of loading a GGUF file once was. Without them every row is compared.
    ``memo`` (:class:`_Verdicts`): the verdicts of an earlier load of the same file by the same code,
    read instead of comparing again, and where new verdicts are written."""
    from evolm import kernels

    t = f.tensors[name]
    if len(t.shape) != 2:
        return None, None
    raw = f.raw(name)
    b = blocks_from_raw(raw, t.ggml_type, t.shape)
    if b is None:
        return None, None
    if memo is not None and name in memo:
        return (b, None) if not memo[name] else (None, memo[name])
    b, why = _compare_blocks(f, name, raw, b, sample_rows, kernels.available())
    if memo is not None:
        memo[name] = why or ""
    return b, why


def _compare_blocks(f: GGUFFile, name: str, raw: np.ndarray, b: Blocks, sample_rows: int,
                    kernel: bool) -> tuple[Blocks | None, str | None]:
    """:func:`_verified_blocks`'s comparison of ``b`` with the reference dequantization."""
    t = f.tensors[name]
    if kernel:
        n = t.shape[0]
        idx = sorted(set(range(min(sample_rows, n))) | set(range(max(0, n - sample_rows), n)))
        ref = dequantize(raw[idx], t.ggml_type, (len(idx), t.shape[1]), name=f"{f.path}: tensor {name!r}")
        same = torch.equal(ref, b.map_rows(lambda x: x[idx]).dequantize(kernel=True))
    else:
        same = rebuilds(b, f.tensor(name))
    return (b, None) if same else (None, f"its {b.source} blocks do not rebuild the float32 weight exactly")


class _Verdicts(dict):
    """{tensor name: "" (its blocks are exact) or why not}, kept on disk per GGUF file and per version of
    the code that decodes and multiplies blocks, so that only the first load of a file compares
    blocks with the ``gguf`` package's reference: importing that package and dequantizing the samples
    was ~0.1 s of every later start of ``evolm generate``."""

    def __init__(self, path: str):
        super().__init__()
        from evolm import kernels
        from evolm.interop import gguf_blocks
        from evolm.interop.gguf_vocab import file_cache_key
        from evolm.quant import blocks

        sources = (Path(__file__), Path(gguf_blocks.__file__), Path(blocks.__file__), *kernels.source_files())
        key = file_cache_key(path, sources, extra=f"kernels={kernels.available()}")
        self.file = None if key is None else _cache_file("verified", f"{key}.json")
        self.read = {}
        if self.file is not None:
            try:
                self.read = {str(k): str(v) for k, v in json.loads(self.file.read_text()).items()}
            except (OSError, ValueError, AttributeError):  # absent or damaged: compare again
                pass
        self.update(self.read)

    def save(self) -> None:
        if self.file is None or self == self.read:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self))
            os.replace(tmp, self.file)  # whole or absent
        except OSError:
            pass  # a read-only cache only costs comparing again


def _cache_file(*parts: str) -> Path:
    from evolm.assets import cache_dir

    return cache_dir().joinpath(*parts)


def _stack_experts(experts: dict, path: str) -> dict[str, torch.Tensor]:
    """Expert tensors -> our (E, 2F, D) gate|up and (E, D, F) down per layer."""
    out = {}
    for (i, kind), w in list(experts.items()):
        if isinstance(w, dict):  # stack per-expert tensors into (E, ...)
            experts[(i, kind)] = torch.stack([w[e] for e in sorted(w)])
    for i in sorted({i for i, _ in experts}):
        gate, up, down = (experts.get((i, k)) for k in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
        if gate is None or up is None or down is None:
            raise GGUFError(f"{path}: layer {i} has an incomplete set of expert tensors")
        out[f"layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)  # (E, 2F, D)
        out[f"layers.{i}.mlp.experts.down_proj"] = down  # (E, D, F)
    return out


def _join_kv_b(split_kv: dict) -> dict[str, torch.Tensor]:
    out = {}
    for i in sorted({i for i, _ in split_kv}):
        k_b, v_b = split_kv[(i, "attn_k_b")], split_kv[(i, "attn_v_b")]  # (H, rank, nope), (H, v, rank)
        kv = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # (H, nope + v, rank)
        out[f"layers.{i}.self_attn.kv_b_proj.weight"] = kv.reshape(-1, kv.shape[-1])
    return out


def state_dict_from_gguf(f: GGUFFile, config: ModelConfig, dtype: torch.dtype = torch.float32,
                         blocks: dict | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized, converted and renamed to our parameter names.

    ``blocks``: a dict to fill with {parameter name: :class:`evolm.quant.blocks.Blocks`} for the 2-D
    block-quantized weights (embeddings, head, layer linears) whose blocks rebuild the float32
    weight bit for bit -- those are not dequantized, and are absent from the result -- and
    {name: reason} under ``"__float__"`` for those that stay float.
    """
    fam = _family(f.architecture, f.path)
    norms = _NORMS_BY_PLACEMENT[config.norm_placement]
    heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}
    sd: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], Any] = {}
    split_kv: dict[tuple[int, str], torch.Tensor] = {}
    memo = _Verdicts(f.path) if blocks is not None else None
    for name in f.tensors:
        try:
            _convert_tensor(f, fam, name, dtype, norms, heads, sd, experts, split_kv, blocks, memo)
        except (RuntimeError, ValueError, IndexError) as e:  # a shape the conversion cannot take
            if isinstance(e, GGUFError):
                raise
            raise GGUFError(f"{f.path}: tensor {name!r} of shape {f.tensors[name].shape} does not fit the "
                            f"{f.architecture!r} model ({first_line(e)})") from None
    if memo is not None:
        memo.save()
    try:
        return {**sd, **_stack_experts(experts, f.path), **_join_kv_b(split_kv)}
    except (RuntimeError, KeyError) as e:
        raise GGUFError(f"{f.path}: the expert / attention tensors do not assemble ({type(e).__name__}: "
                        f"{first_line(e)})") from None


def _convert_tensor(f: GGUFFile, fam, name: str, dtype, norms, heads, sd, experts, split_kv, blocks,
                    memo=None) -> None:
    """One file tensor, dequantized and converted, into ``sd`` (or ``experts`` / ``split_kv``), or
    kept as its blocks in ``blocks`` (when that is a dict and the blocks are exact)."""
    if name == "rope_freqs.weight":  # Llama 3.1-style per-frequency divisors, kept in float32
        sd["__rope_freqs__"] = f.tensor(name)
        return
    where, key = _our_name(name, norms, f.path, f.architecture)
    rows = None
    kind = name.split(".")[2] if name.startswith("blk.") else None
    if where == "param" and fam.gguf_permute_qk and kind in heads:  # llama.cpp permutes only where it uses
        rows = lambda t, n=heads[kind]: unpermute_rope_rows(t, n)  # noqa: E731  interleaved RoPE
    if blocks is not None and where == "param":
        b, why = _verified_blocks(f, name, memo=memo)
        if b is not None:
            blocks[key] = b.map_rows(rows) if rows else b  # float only if the model needs it (load_gguf)
            return
        if why:
            blocks.setdefault("__float__", {})[key] = why
    w = f.tensor(name)  # float32
    if fam.unit_offset_norms and name.endswith("norm.weight"):
        w = w - 1.0  # stored as (1 + w); subtracted in float32, as transformers does
    w = _from_llama_cpp_ssm(name, w)
    w = w.to(dtype)  # one tensor at a time: peak memory stays near the final model's
    if where == "expert":
        i, kind, e = key
        if e is None:
            experts[(i, kind)] = w
        else:
            experts.setdefault((i, kind), {})[e] = w
        return
    if where == "split_kv":
        split_kv[key] = w
        return
    if where == "split_qkv":  # rows: n_heads + 2 n_kv_heads heads of equal size
        head = w.shape[0] // (heads["attn_q"] + 2 * heads["attn_k"])
        sizes = [heads["attn_q"] * head, heads["attn_k"] * head, heads["attn_k"] * head]
        for part, chunk in zip("qkv", w.split(sizes, dim=0)):
            sd[key.format(part)] = chunk.contiguous()
        return
    sd[key] = rows(w) if rows else w


def _from_llama_cpp_ssm(name: str, w: torch.Tensor) -> torch.Tensor:
    """Undo what llama.cpp's converter does to Mamba's tensors: ``ssm_a`` holds ``A = -exp(A_log)``,
    ``ssm_conv1d`` the depthwise filters without their singleton input-channel axis."""
    if name.endswith(".ssm_a"):
        return torch.log(-w)
    if name.endswith(".ssm_conv1d.weight"):
        return w.unsqueeze(1)
    return w


def _take_blocks(model, found: dict, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, str]:
    """The empty model's linear layers named in ``found`` become ``BlockLinear``s holding the file's
    blocks (:func:`evolm.quant.blocks.keep_blocks`), before any float weight is made: only the
    weights the blocks did not replace -- the embedding a tied head's blocks copy, a 2-D weight that
    is not a linear layer (or that the model does not have: the name check then refuses it) -- are
    dequantized into ``sd``, which also gets the blocks' buffers (what ``assign_weights`` then puts
    in place). Returns the per-parameter report (``model.blocks_report``)."""
    from evolm.quant.blocks import keep_blocks

    stayed = found.pop("__float__", {})
    report = keep_blocks(model, found, dtype)
    params = dict(model.named_parameters())
    for key, b in found.items():
        if key in params or not report.get(key, "").startswith("kept"):
            sd[key] = b.dequantize().to(dtype)
    sd.update((k, t) for k, t in model.state_dict().items() if not t.is_meta)
    return {**report, **{k: f"float: {v}" for k, v in stayed.items()}}


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              device: str | torch.device | None = None, tokenizer: bool = True, blocks: bool = False,
              allow_large: bool | None = None):
    """Load a GGUF file: returns ``(Transformer, Tokenizer)`` (tokenizer ``None`` if not asked).

    Weights are dequantized to ``dtype``. Architectures: ``SUPPORTED_ARCHS``.

    ``blocks=True`` (inference on CPU): linear layers (and a tied head) whose tensors are in one of
    ``gguf_blocks.KEPT_TYPES`` keep the file's blocks (:class:`evolm.quant.blocks.BlockLinear`, fp32
    arithmetic with bit-identical weights, 5-10 bits read per weight instead of 32);
    ``model.blocks_report`` says, per parameter, what was kept and why anything stayed float.

    Every problem with the file is a :class:`GGUFError` naming it; sizes in the metadata are checked
    against the file's tensors and this machine's memory before the model is built
    (``allow_large=True`` lifts the memory check, see :func:`evolm.interop.empty.check_fits`).
    """
    if blocks and torch.device(device or "cpu").type != "cpu":
        raise GGUFError(f"{path}: keeping quantized blocks (blocks=True, --keep-blocks) is a CPU path; "
                        f"use --device cpu")
    f = GGUFFile(path, tokenizer=tokenizer)
    config = config_from_metadata(f.metadata, {n: t.shape for n, t in f.tensors.items()}, f.path)
    try:
        check_layers(config, f.tensors, f.path, pattern=r"blk\.(\d+)\.")
        model = build_empty(config, f.path, allow_large, torch.empty((), dtype=dtype).element_size())
    except (ConfigError, WeightsError) as e:
        raise GGUFError(str(e)) from None
    found: dict | None = {} if blocks else None
    sd = state_dict_from_gguf(f, config, dtype, blocks=found)
    rope_freqs = sd.pop("__rope_freqs__", None)
    if found is not None:
        model.blocks_report = _take_blocks(model, found, sd, dtype)
    expected = set(model.state_dict())
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise GGUFError(f"{f.path}: tensors do not match the {f.architecture!r} model built from its metadata: "
                        f"missing {missing[:6]}, unexpected {unexpected[:6]}")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for k, v in sd.items():
        want = shapes[k]
        if tuple(v.shape) != tuple(want):
            raise GGUFError(f"{f.path}: tensor for {k!r} has shape {tuple(v.shape)}, the config expects {tuple(want)}")
    assign_weights(model, sd, source=str(f.path))
    if rope_freqs is not None and config.pos_emb == "rope":  # Llama 3.1-style per-frequency divisors
        if rope_freqs.shape != model.rotary.inv_freq.shape:
            raise GGUFError(f"{f.path}: tensor 'rope_freqs.weight' has shape {tuple(rope_freqs.shape)}; expected "
                            f"{tuple(model.rotary.inv_freq.shape)} (one divisor per rotary frequency)")
        model.rotary.inv_freq = model.rotary.inv_freq / rope_freqs.float()
    model.to(device=device or "cpu")
    model.eval()
    try:
        tok = tokenizer_from_gguf_metadata(f.metadata, name=f.path, cache_key=file_cache_key(f.path)) \
            if tokenizer else None
    except TokenizerError as e:  # the file's vocabulary: still the GGUF file's error
        raise GGUFError(str(e) if f.path in str(e) else f"{f.path}: {e}") from None
    return model, tok


# ----------------------------------------------------------------------------------------------
# the real GGUF files that ship in PyPI packages (`make models` builds them into the asset cache)
# ----------------------------------------------------------------------------------------------
def find_asset(name: str) -> Path:
    """Path of a packaged GGUF: ``"smollm2"`` (SmolLM2-135M-Instruct Q4_1) or ``"gemma3"``
    (Gemma 3 270M Q4_K_M, four chunk packages concatenated).

    The files are built by ``make models`` from the wheels pinned in ``evolm/assets.toml`` into
    ``$EVOLM_CACHE/models`` (sha256 checked). A model whose wheels are cached but which is not built
    yet is built here (no network). Raises ``FileNotFoundError`` saying how to install it.
    """
    from evolm import assets

    aliases = {"smollm2": "smollm2", "smollm2-135m-instruct": "smollm2",
               "gemma3": "gemma3", "gemma3-270m": "gemma3", "gemma-3-270m": "gemma3"}
    if name not in aliases:
        raise ValueError(f"unknown asset {name!r}; known: 'smollm2', 'gemma3'")
    return assets.find_model(aliases[name])


__all__ = ["load_gguf", "GGUFFile", "GGUFError", "config_from_metadata", "state_dict_from_gguf",
           "read_metadata", "dequantize", "unpermute_rope_rows", "find_asset", "SUPPORTED_ARCHS"]
