"""The lab: experiments on your own runs (issue 27). ``scaling``: Chinchilla-style scaling-law
fits (approach 2 IsoFLOP parabolas, approach 3 parametric law with bootstrap intervals) and the
compute-optimal split of a budget."""

from evolm.lab.scaling import LawFit, LossLaw, fit_isoflop, fit_loss_law

__all__ = ["LawFit", "LossLaw", "fit_isoflop", "fit_loss_law"]
