"""The weight layout the encoder families (BERT, RoBERTa, ModernBERT) share, from per-family tables.

transformers stores an encoder as a base model (``bert.``, ``roberta.``, ``model.``; nothing for a
bare ``BertModel``) plus a task head beside it (``cls.predictions.``, ``lm_head.``, ``classifier.``,
``head.`` ...), and which head a folder holds is its ``architectures`` entry. A family describes its
names in a ``Layout``; this module reads and writes them. Names our model does not use are dropped
on reading only where they are known: the tied copies of the embedding matrix, BERT's
next-sentence head, a pooler under a head that reads no pooler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import torch

from evolm.config import ModelConfig
from evolm.interop.families.decoder import err

if TYPE_CHECKING:
    from evolm.interop.families.base import Family


@dataclass(frozen=True)
class Layout:
    """One encoder family's module names; every name maps a module (``.weight`` / ``.bias`` follow)."""

    base: str  # the base model's attribute in the task models ("bert")
    architectures: Mapping[str, str]  # our ModelConfig.head -> transformers' class for it
    top: Mapping[str, str]  # modules of the base model outside its layers -> ours
    layer: Mapping[str, str]  # modules below one layer -> ours (below ``layers.{i}.``)
    # task-head modules -> ours; a name starting with "{base}." lies inside the base model (BERT's pooler)
    head: Mapping[str, str]
    # the sequence classifier's modules where they differ from ``head``'s (RoBERTa's classifier.out_proj)
    classify_head: Mapping[str, str] = field(default_factory=dict)
    unused: tuple[str, ...] = ()  # modules read and dropped (tied decoders, BERT's next-sentence head)
    # fused modules below a layer -> the equal row blocks they hold, in order (ModernBERT's Wqkv, Wi)
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def head_of(self, h: dict) -> str:
        """Our ``head`` for the folder's ``architectures`` (transformers' class it was saved from)."""
        arch = (h.get("architectures") or [self.architectures["lm"]])[0]
        heads = {a: ours for ours, a in self.architectures.items()}
        if arch not in heads:
            raise err(f"architectures {arch!r} is not supported; expected one of {sorted(heads)}")
        return heads[arch]


def _head_params(config: ModelConfig) -> set[str]:
    """Our names of the task-head parameters that ``config``'s model holds."""
    from evolm.nn.heads import Head
    if not Head.wanted(config):
        return set()
    with torch.device("meta"):
        return {f"head.{k}" for k in Head(config).state_dict()}


def outer_from_hf(lay: Layout, fam: Family, config: ModelConfig, name: str) -> str | None:
    """A weight outside the layers (below the base model's prefix, or a head's full name) -> ours;
    ``""`` for a known weight this config does not use, None for an unknown one."""
    mod, _, kind = name.rpartition(".")
    heads = {**lay.head, **lay.classify_head}
    inside = {k.removeprefix(lay.base + "."): v for k, v in heads.items() if k.startswith(lay.base + ".")}
    ours = lay.top.get(mod) or inside.get(mod) or heads.get(mod)
    if ours is not None:
        ours = f"{ours}.{kind}"  # "head" itself holds BERT's decoder bias: head.bias
        return ours if not ours.startswith("head.") or ours in _head_params(config) else ""
    if mod.startswith(lay.unused) or name.startswith(lay.unused) or name.endswith("position_ids"):
        return ""
    return None


def layer_from_hf(lay: Layout, fam: Family, config: ModelConfig, name: str, t: torch.Tensor, i: int, out: dict,
                  experts: dict) -> bool:
    L = f"layers.{i}."
    mod, _, kind = name.rpartition(".")
    if mod in lay.fused:
        for part, chunk in zip(lay.fused[mod], t.chunk(len(lay.fused[mod]), dim=0)):
            out[f"{L}{part}.{kind}"] = chunk.contiguous()
        return True
    if mod in lay.layer:
        out[f"{L}{lay.layer[mod]}.{kind}"] = t
        return True
    return False


def weights_to_hf(lay: Layout, fam: Family, sd: dict[str, torch.Tensor], config: ModelConfig,
                  fused_experts: bool) -> dict[str, torch.Tensor]:
    """Ours -> the task model transformers builds for ``config.head`` (a bare base model for "embed")."""
    p = "" if config.head == "embed" else lay.base + "."
    top = {v: k for k, v in lay.top.items()}
    layer = {v: k for k, v in lay.layer.items()}
    heads = {**lay.head, **lay.classify_head} if config.head == "classify" else lay.head
    head = {v: k.replace(lay.base + ".", p, 1) for k, v in heads.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for k, t in sd.items():
        mod, _, kind = k.rpartition(".")
        if k.startswith("layers."):
            _, i, sub = mod.split(".", 2)
            parent = next((f for f, parts in lay.fused.items() if sub in parts), None)
            if parent is not None:
                fused.setdefault((i, parent, kind), {})[sub] = t
            else:
                out[f"{p}{fam.layer_tag}{i}.{layer[sub]}.{kind}"] = t
        elif mod in head:
            out[f"{head[mod]}.{kind}"] = t
        else:
            out[f"{p}{top[mod]}.{kind}"] = t
    for (i, parent, kind), parts in fused.items():
        out[f"{p}{fam.layer_tag}{i}.{parent}.{kind}"] = torch.cat([parts[s] for s in lay.fused[parent]], 0)
    return out


def num_labels(h: dict) -> int:
    """transformers' label count: the length of ``id2label`` when the file has one."""
    labels = h.get("id2label")
    return len(labels) if isinstance(labels, dict) and labels else int(h.get("num_labels", 2))


def labels_to_hf(c: ModelConfig, out: dict) -> None:
    """``id2label`` / ``label2id`` for a classifier: the names the model was read with, else LABEL_i."""
    if c.head not in ("classify", "token_classify"):
        return
    names = (c.meta.get("hf") or {}).get("id2label") if isinstance(c.meta, dict) else None
    if not (isinstance(names, dict) and len(names) == c.num_labels):
        names = {str(i): f"LABEL_{i}" for i in range(c.num_labels)}
    out["id2label"] = {str(k): v for k, v in names.items()}
    out["label2id"] = {v: int(k) for k, v in names.items()}
