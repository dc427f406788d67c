"""The lab: measure what each innovation buys (issue 27). ``ablate`` / ``ladder``: variants at equal
compute over seeds with a significance test; ``budget`` and ``stats``: their rules; ``scaling``:
Chinchilla-style scaling-law fits (approach 2 IsoFLOP parabolas, approach 3 parametric law with
bootstrap intervals) and the compute-optimal split of a budget; ``flatten``: a config as one file."""

from evolm.lab.scaling import LawFit, LossLaw, fit_isoflop, fit_loss_law

__all__ = ["LawFit", "LossLaw", "fit_isoflop", "fit_loss_law"]
