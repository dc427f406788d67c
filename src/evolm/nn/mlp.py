"""Feed-forward layers: the GELU MLP and gated linear units (SwiGLU, GeGLU).

- GPT-2's MLP: ``down(gelu(up(x)))`` with a 4x inner width (GELU: Hendrycks & Gimpel 2016,
  arXiv:1606.08415; GPT-2 uses the tanh approximation).
- Gated linear units (Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202):
  ``down(act(gate(x)) * up(x))``. SwiGLU (act = SiLU) is Llama's, Mistral's, Qwen's, OLMo's and
  DeepSeek's; GeGLU (act = tanh-GELU) is Gemma's. A third matrix, so the inner width is usually
  ~8/3 d instead of 4 d at equal parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm.nn.fuse import fuse_linears


def activation_fn(name: str):
    return {
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
        "relu": F.relu,
    }[name]


class MLP(nn.Module):
    """Dense feed-forward: plain (``mlp='mlp'``) or gated (``mlp='glu'``)."""

    def __init__(self, config, d_ff: int | None = None):
        super().__init__()
        c = config
        d_ff = c.d_ff if d_ff is None else d_ff
        self.gated = c.mlp == "glu"
        if self.gated:
            self.gate_proj = nn.Linear(c.d_model, d_ff, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.d_model, d_ff, bias=c.mlp_bias)
        self.down_proj = nn.Linear(d_ff, c.d_model, bias=c.mlp_bias)
        self.act = activation_fn(c.activation)

    @torch.no_grad()
    def fuse_gate_up(self) -> None:
        """Inference only: one ``gate_up_proj`` matmul (gate rows, then up rows) instead of two.

        Replaces gate_proj/up_proj (so the state_dict changes); see ``Transformer.fuse_for_inference``.
        """
        if not self.gated or hasattr(self, "gate_up_proj"):
            return
        fused = fuse_linears([self.gate_proj, self.up_proj])
        if fused is None:  # layers that cannot be stacked (e.g. different quantized layouts) stay apart
            return
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(h)
