"""Pruning (issue 28): make a model cheaper by removing weights.

- Unstructured and n:m semi-structured (``unstructured.py``): magnitude, Wanda (``wanda.py``) and
  SparseGPT (``sparsegpt.py``) zero weights of the block linears; the model keeps its shape
  (masks and targets in ``masks.py``).
- Structured, Minitron-style (``structured.py``): whole heads, channels and layers cut, a smaller config.

``evolm prune --method ...`` runs either; every result is an ordinary evolm folder.
"""

from evolm.prune.masks import PruneError, Sparsity
from evolm.prune.sparsegpt import SparseGPTConfig, sparsegpt_prune
from evolm.prune.unstructured import METHODS, PruneConfig, prune_model, run_prune
from evolm.prune.wanda import magnitude_mask, wanda_mask

__all__ = ["PruneError", "Sparsity", "SparseGPTConfig", "sparsegpt_prune", "METHODS", "PruneConfig", "prune_model",
           "run_prune", "magnitude_mask", "wanda_mask"]
