"""The image encoder of a Llama 3.2-Vision-style model: a tiled ViT with gated global layers.

- ViT (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", arXiv:2010.11929): an image is cut
  into ``patch_size`` squares, each linearly embedded (a strided convolution), a class token is
  put in front, learned positions are added, and a bidirectional transformer reads the sequence.
- Llama 3 vision (Llama 3 herd, arXiv:2407.21783, sec. 7.2; Meta's Llama 3.2-Vision): a large
  image is resized onto up to ``max_num_tiles`` tiles of ``image_size`` pixels, in one of the
  ``supported_aspect_ratios`` (rows, columns). Each tile is a ViT sequence; learned embeddings per
  aspect ratio say which tile of which tiling a patch is in (before the encoder, and again before
  the global layers), each behind a tanh gate initialised at 0. A local encoder of ``n_layers``
  blocks is followed by ``n_global_layers`` blocks whose residual branches are scaled by tanh
  gates (as Flamingo's, arXiv:2204.14198), all tiles of an image in one sequence. The states of
  ``intermediate_layers`` of the local encoder are kept and concatenated to the final ones, so
  the text model sees low-level features as well ("multi-layer features", sec. 7.2).

The blocks are evolm's own (``nn/block.py``: pre-norm LayerNorm, MHA without biases, a GELU MLP)
with a bidirectional mask; only the embeddings and the mask over padding tiles are new here.
The mask follows Meta's reference (and transformers'): each tile's sequence is padded to a
multiple of 8 tokens, and a key is hidden from a query only when both are padding (a padding
patch or a tile the image does not use); real tokens see the padding, whose states are zero after
``layernorm_pre``. Parity: tests/test_vision.py against transformers' ``MllamaVisionModel``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm.config import ModelConfig, VisionConfig
from evolm.nn.block import Block
from evolm.nn.masks import padded_tiles_mask
from evolm.nn.norm import LayerNorm

PAD_MULTIPLE = 8  # each tile's sequence is padded to a multiple of 8 tokens (Meta's reference)


def block_config(v: VisionConfig) -> ModelConfig:
    """The ``ModelConfig`` of the encoder's blocks: evolm's parts as a CLIP-style ViT layer."""
    return ModelConfig(name="vision-encoder", vocab_size=1, d_model=v.d_model, n_layers=v.n_layers + v.n_global_layers,
                       n_heads=v.n_heads, d_ff=v.d_ff, max_seq_len=v.max_num_tiles * v.patches_per_tile,
                       norm="layernorm", norm_eps=v.norm_eps, pos_emb="none", qkv_bias=False, o_bias=False,
                       mlp="mlp", activation=v.activation, mlp_bias=True, mask="bidirectional")


class TileEmbedding(nn.Module):
    """One learned vector per (aspect ratio, tile), added to every patch of the tile behind a
    tanh gate (0 at initialisation: the encoder starts as a plain per-tile ViT)."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.max_num_tiles, self.d = v.max_num_tiles, v.d_model
        self.embedding = nn.Embedding(len(v.supported_aspect_ratios) + 1, v.max_num_tiles * v.d_model)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (N, tiles, P, d), aspect_ratio_ids (N,)."""
        e = self.embedding(aspect_ratio_ids).view(-1, self.max_num_tiles, 1, self.d)[:, :x.shape[1]]
        return x + e * self.gate.tanh()


class PositionEmbedding(nn.Module):
    """Learned positions of a tile's tokens, mixed by one gate with a table per (aspect ratio,
    tile, position): ``(1 - tanh g) * pos + tanh g * tile_pos``."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.max_num_tiles, self.P, self.d = v.max_num_tiles, v.patches_per_tile, v.d_model
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.randn(self.P, self.d) * self.d ** -0.5)
        self.tile_embedding = nn.Embedding(len(v.supported_aspect_ratios) + 1, self.max_num_tiles * self.P * self.d)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        g = self.gate.tanh()
        x = x + (1 - g) * self.embedding
        tile = self.tile_embedding(aspect_ratio_ids).view(-1, self.max_num_tiles, self.P, self.d)[:, :x.shape[1]]
        return x + g * tile


class VisionEncoder(nn.Module):
    """pixel_values (B, images, tiles, C, H, W) -> image states (B, images, tiles, P, output_dim),
    P = patches per tile + 1 (the class token). Module names follow transformers' Mllama."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.config = v
        bc = block_config(v)
        self.patch_embedding = nn.Conv2d(v.num_channels, v.d_model, v.patch_size, v.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(v.d_model) * v.d_model ** -0.5)
        self.gated_positional_embedding = PositionEmbedding(v)
        self.pre_tile_positional_embedding = TileEmbedding(v)
        self.post_tile_positional_embedding = TileEmbedding(v)
        self.layernorm_pre = LayerNorm(v.d_model)  # torch's default eps (1e-5), as the reference
        self.layernorm_post = LayerNorm(v.d_model)
        self.layers = nn.ModuleList(Block(bc, i) for i in range(v.n_layers))
        # the global layers start with tanh(pi/4) ~ 0.66 on each branch (transformers' constructor)
        self.global_layers = nn.ModuleList(Block(bc, v.n_layers + i, gate_init=math.pi / 4)
                                           for i in range(v.n_global_layers))

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor | None = None) -> torch.Tensor:
        v = self.config
        if pixel_values.ndim != 6:
            raise ValueError(f"pixel_values must be (batch, images, tiles, channels, height, width), "
                             f"got shape {tuple(pixel_values.shape)}")
        B, I, T, C, H, W = pixel_values.shape
        if (C, H, W) != (v.num_channels, v.image_size, v.image_size) or T > v.max_num_tiles:
            raise ValueError(f"pixel_values: tiles of ({C}, {H}, {W}), {T} tiles; the config wants "
                             f"({v.num_channels}, {v.image_size}, {v.image_size}) and at most {v.max_num_tiles} tiles")
        N, d = B * I, v.d_model
        ar = aspect_ratio_ids.reshape(N)
        tiles_valid = torch.ones(N, T, dtype=torch.bool, device=pixel_values.device) if aspect_ratio_mask is None \
            else aspect_ratio_mask.reshape(N, T).bool()
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.reshape(N * T, C, H, W).to(w.device, w.dtype))
        x = self.pre_tile_positional_embedding(x.flatten(2).transpose(1, 2).reshape(N, T, -1, d), ar)
        x = torch.cat([self.class_embedding.expand(N, T, 1, d).to(x.dtype), x], dim=2)
        x = self.layernorm_pre(self.gated_positional_embedding(x, ar))
        P = x.shape[2]
        L = P + (-P) % PAD_MULTIPLE
        x = F.pad(x, (0, 0, 0, L - P)).reshape(N, T * L, d)
        mask = padded_tiles_mask(tiles_valid, P, L)
        kept = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, None, mask, False)
            if i in v.intermediate_layers:
                kept[i] = x
        x = self.post_tile_positional_embedding(self.layernorm_post(x).view(N, T, L, d), ar).reshape(N, T * L, d)
        for layer in self.global_layers:
            x = layer(x, None, mask, False)
        # the kept states feature-interleaved (d, k) -> d * k, as the reference stacks them
        if kept:
            x = torch.cat([x, torch.stack([kept[i] for i in v.intermediate_layers], dim=-1).flatten(-2)], dim=-1)
        out = x.view(N, T, L, -1)[:, :, :P]
        return out.reshape(B, I, T, P, -1)


__all__ = ["VisionEncoder", "TileEmbedding", "PositionEmbedding", "block_config", "PAD_MULTIPLE"]
