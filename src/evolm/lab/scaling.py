"""Scaling-law fits on your own runs: how loss falls with parameters N and tokens D, and how to
split a compute budget between them.

Two of the three estimates of Hoffmann et al. 2022, "Training Compute-Optimal Large Language
Models" (arXiv:2203.15556), done as the Besiroglu et al. 2024 replication (arXiv:2404.10102)
recommends:

- Approach 3 (``fit_loss_law``): the parametric law L(N, D) = E + A/N^alpha + B/D^beta, fitted by
  minimising the Huber loss (delta = 1e-3) between log predicted and log observed loss, with the
  prediction written as a log-sum-exp of a - alpha*ln N, b - beta*ln D and e (a = ln A, b = ln B,
  e = ln E) so that every term stays positive without constraints. L-BFGS runs from every point of
  a grid of initialisations and the best optimum wins, because the objective has several local
  minima. The replication traced Hoffmann's implausible estimates to an optimiser that stopped
  early on a badly scaled loss; here the objective is divided by delta and by the number of points
  (the minimiser is unchanged) and the tolerances are tight. Bootstrap intervals: resample points
  with replacement, refit, take percentiles.
- Approach 2 (``fit_isoflop``): for runs grouped by equal compute C, a parabola of loss against
  ln N gives the loss-minimising N at that C; power laws N_opt = k C^a and D_opt = k' C^b are then
  fitted across budgets.

Compute convention: C = flops_per_token * N * D, with 6 FLOPs per parameter per token by default
(2 for the forward pass, 4 for the backward; Kaplan et al. 2020, arXiv:2001.08361, section 2.1),
the convention of both papers. Which N the points count (with or without the embedding matrices)
is the caller's choice and changes the answer: Pearce & Song 2024 (arXiv:2406.12907) trace much
of the Kaplan/Chinchilla disagreement to it; Chinchilla counts every parameter.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field

import numpy as np

HUBER_DELTA = 1e-3
FLOPS_PER_TOKEN = 6.0

# The grid of initialisations Hoffmann et al. 2022 used for approach 3, for
# (alpha, beta, e, a, b): 5 x 5 x 5 x 6 x 6 = 4,500 starts.
HOFFMANN_GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
PARAMETERS = ("E", "A", "B", "alpha", "beta")


# --- the law and the compute-optimal split ----------------------------------------------------
@dataclass(frozen=True)
class Allocation:
    """The compute-optimal split of one budget: C = flops_per_token * N * D."""

    C: float
    N: float
    D: float

    @property
    def tokens_per_param(self) -> float:
        return self.D / self.N


@dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def compute_optimal(self, C: float, flops_per_token: float = FLOPS_PER_TOKEN) -> Allocation:
        """Minimise L along C = k N D in closed form (Hoffmann et al. 2022, eq. 4):
        setting dL/dN = 0 with D = C / (k N) gives N_opt = G (C/k)^a, D_opt = G^-1 (C/k)^b with
        G = (alpha A / (beta B))^(1/(alpha+beta)), a = beta/(alpha+beta), b = alpha/(alpha+beta).
        With an exponent or a coefficient that is not positive (a degenerate fit, e.g. a bootstrap
        resample where loss does not fall with N) there is no interior optimum: N and D are NaN."""
        if not all(math.isfinite(x) and x > 0 for x in (self.A, self.B, self.alpha, self.beta)):
            return Allocation(C=C, N=math.nan, D=math.nan)
        s = self.alpha + self.beta
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        tokens_flops = C / flops_per_token
        return Allocation(C=C, N=G * tokens_flops ** (self.beta / s), D=tokens_flops ** (self.alpha / s) / G)

    @classmethod
    def from_theta(cls, theta) -> "LossLaw":
        """theta = (a, b, e, alpha, beta) with a = ln A, b = ln B, e = ln E."""
        a, b, e, alpha, beta = (float(x) for x in theta)
        with np.errstate(over="ignore"):  # a degenerate refit's coefficient may be inf: no optimum
            return cls(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=alpha, beta=beta)


# --- approach 3: the Huber fit in log space ----------------------------------------------------
def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber value and derivative of each residual."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    return value, np.where(small, r, delta * np.sign(r))


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Mean Huber of (LSE(a - alpha ln N, b - beta ln D, e) - ln L) / delta, and its gradient.
    The scale (1 / (delta n)) keeps the values near the size of a residual, so the optimiser's
    tolerances mean the same thing whatever delta and the number of points are."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    weights /= total  # d LSE / d term: a softmax over the three terms
    residual = top + np.log(total) - log_loss
    value, slope = _huber(residual, delta)
    scale = 1.0 / (delta * len(log_loss))
    pulls = slope * weights
    grad = np.array([pulls[0].sum(), pulls[1].sum(), pulls[2].sum(),
                     -(pulls[0] * log_n).sum(), -(pulls[1] * log_d).sum()])
    return float(value.sum() * scale), grad * scale


def _lbfgs(theta0, data, delta: float):
    from scipy.optimize import minimize  # here, so that building the CLI's parser stays quick

    return minimize(_objective, np.asarray(theta0, dtype=float), args=(*data, delta), jac=True,
                    method="L-BFGS-B", options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-8})


def _one_blas_thread():
    """scipy's L-BFGS-B calls BLAS/LAPACK on vectors of five numbers, and a multi-threaded BLAS
    costs more than it saves there: on a 2-core machine shared with other jobs one optimiser step
    took ~1 ms instead of ~0.1 ms (a 40-refit bootstrap: 44 s instead of 7 s). threadpoolctl, where
    installed, keeps the fit on one BLAS thread; without it the answer is the same, only slower when
    the CPUs are busy."""
    import scipy.optimize  # noqa: F401  (loads scipy's BLAS first: threadpoolctl limits loaded libraries only)

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _best_of(starts, data, delta: float):
    """Run L-BFGS from every start; the lowest optimum and the starts ordered by where they ended."""
    results = [(r, s) for s in starts if np.isfinite((r := _lbfgs(s, data, delta)).fun)]
    if not results:
        raise ValueError("the scaling-law fit did not converge from any initialisation")
    results.sort(key=lambda rs: rs[0].fun)
    return results[0][0], [s for _, s in results]


@dataclass(frozen=True)
class LawFit:
    """An approach-3 fit: the law, percentile intervals from the bootstrap refits, the objective."""

    law: LossLaw
    n_points: int
    objective: float  # sum over points of Huber(ln predicted - ln observed), the papers' loss
    huber_delta: float
    confidence: float
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # empty without bootstrap
    bootstrap: tuple[LossLaw, ...] = ()

    def allocation_intervals(self, C: float, flops_per_token: float = FLOPS_PER_TOKEN) -> dict:
        """Percentile intervals of N_opt, D_opt and D/N at C over the bootstrap refits."""
        if not self.bootstrap:
            return {}
        splits = [law.compute_optimal(C, flops_per_token) for law in self.bootstrap]
        values = {"N": [s.N for s in splits], "D": [s.D for s in splits],
                  "tokens_per_param": [s.tokens_per_param for s in splits]}
        return {k: _percentiles(v, self.confidence) for k, v in values.items()}


def _percentiles(values, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` interval of the finite values (degenerate refits left out)."""
    tail = 50.0 * (1.0 - confidence)
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def grid_starts(grid: dict = HOFFMANN_GRID) -> list[tuple[float, ...]]:
    """Every combination of the grid, ordered as theta = (a, b, e, alpha, beta)."""
    return list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"]))


def screen_starts(starts, data, delta: float, keep: int | None) -> list:
    """The ``keep`` starts with the lowest objective (all of them when ``keep`` is None). Hoffmann's
    grid has 4,500 points and one L-BFGS run costs tens of milliseconds; the objective at a point
    costs tens of microseconds, so ranking first and descending from the most promising keeps a
    fit to seconds (``keep=None`` runs every start, as the papers do)."""
    if keep is None or keep >= len(starts):
        return list(starts)
    values = [_objective(np.asarray(s, dtype=float), *data, delta)[0] for s in starts]
    order = np.argsort(np.nan_to_num(values, nan=np.inf), kind="stable")
    return [starts[i] for i in order[:keep]]


def fit_loss_law(N, D, loss, *, grid: dict = HOFFMANN_GRID, starts: int | None = 64, bootstrap: int = 0,
                 seed: int = 0, confidence: float = 0.95, delta: float = HUBER_DELTA,
                 bootstrap_starts: int = 2) -> LawFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (approach 3) by L-BFGS from the ``starts`` most
    promising points of ``grid`` (see ``screen_starts``) and, with ``bootstrap`` > 0, percentile
    intervals from that many refits on points resampled with replacement (numpy generator ``seed``).
    Each refit starts from the full fit's optimum and from the ``bootstrap_starts`` grid points whose
    runs ended lowest: a resample moves the optimum little, and a full grid per refit would cost
    hundreds of times more for the same answer."""
    N, D, loss = (np.asarray(x, dtype=float) for x in (N, D, loss))
    if not (N.shape == D.shape == loss.shape and N.ndim == 1):
        raise ValueError("N, D and loss must be 1-D arrays of the same length")
    if len(N) < len(PARAMETERS) + 1:
        raise ValueError(f"the fit has {len(PARAMETERS)} parameters and needs at least "
                         f"{len(PARAMETERS) + 1} points; got {len(N)}")
    if min(N.min(), D.min(), loss.min()) <= 0:
        raise ValueError("N, D and loss must all be positive")
    data = (np.log(N), np.log(D), np.log(loss))
    with _one_blas_thread():
        best, ranked = _best_of(screen_starts(grid_starts(grid), data, delta, starts), data, delta)
        refit_starts = [tuple(best.x)] + ranked[:bootstrap_starts]
        refits = _bootstrap_refits(data, refit_starts, delta, bootstrap, seed) if bootstrap > 0 else ()
    law = LossLaw.from_theta(best.x)
    objective = best.fun * delta * len(N)
    if not refits:
        return LawFit(law, len(N), objective, delta, confidence)
    intervals = {p: _percentiles([getattr(r, p) for r in refits], confidence) for p in PARAMETERS}
    return LawFit(law, len(N), objective, delta, confidence, intervals, refits)


def _bootstrap_refits(data, starts, delta: float, count: int, seed: int) -> tuple[LossLaw, ...]:
    """``count`` refits, each on the runs resampled with replacement (Efron's bootstrap)."""
    rng = np.random.default_rng(seed)
    n = len(data[0])
    refits = []
    for _ in range(count):
        pick = rng.integers(0, n, n)
        refit, _ = _best_of(starts, tuple(x[pick] for x in data), delta)
        refits.append(LossLaw.from_theta(refit.x))
    return tuple(refits)


# --- approach 2: IsoFLOP parabolas ---------------------------------------------------------------
@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * C^exponent."""

    coefficient: float
    exponent: float

    def __call__(self, C):
        return self.coefficient * np.asarray(C, dtype=float) ** self.exponent


@dataclass(frozen=True)
class IsoFlopMinimum:
    """The bottom of one IsoFLOP curve: loss = c2 (ln N)^2 + c1 ln N + c0 at fixed C."""

    C: float
    N_opt: float
    D_opt: float
    loss_min: float
    parabola: tuple[float, float, float]  # (c2, c1, c0) in ln N
    inside_range: bool  # False: the minimum lies outside the sizes run at this C (an extrapolation)
    n_runs: int


@dataclass(frozen=True)
class IsoFlopFit:
    minima: tuple[IsoFlopMinimum, ...]
    N_opt: PowerLaw
    D_opt: PowerLaw


def group_by_budget(C, rtol: float = 1e-2) -> list[np.ndarray]:
    """Indices of runs whose budgets agree within ``rtol`` (budgets logged as 6ND round apart)."""
    C = np.asarray(C, dtype=float)
    order = np.argsort(C, kind="stable")
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or C[order[i]] > C[order[start]] * (1.0 + rtol):
            groups.append(order[start:i])
            start = i
    return groups


def isoflop_minimum(C: float, N, D, loss) -> IsoFlopMinimum:
    """Fit the parabola of loss against ln N at one budget and read off its minimum; D at that N
    comes from a straight line of ln D against ln N through the same runs (exactly C / (k N) when
    the runs satisfy C = k N D, and still right when C was counted another way)."""
    log_n, log_d, loss = np.log(np.asarray(N, float)), np.log(np.asarray(D, float)), np.asarray(loss, float)
    if len(np.unique(log_n)) < 3:
        raise ValueError(f"the IsoFLOP group at C={C:.3g} needs at least 3 different N for a parabola; "
                         f"got {len(np.unique(log_n))}")
    c2, c1, c0 = np.polyfit(log_n, loss, 2)
    if c2 <= 0:
        raise ValueError(f"the loss at C={C:.3g} does not curve upwards in ln N (no minimum); "
                         "add runs on both sides of the best size")
    log_n_opt = -c1 / (2.0 * c2)
    slope, intercept = np.polyfit(log_n, log_d, 1)
    return IsoFlopMinimum(
        C=float(C), N_opt=float(np.exp(log_n_opt)), D_opt=float(np.exp(slope * log_n_opt + intercept)),
        loss_min=float(c0 - c1 * c1 / (4.0 * c2)), parabola=(float(c2), float(c1), float(c0)),
        inside_range=bool(log_n.min() <= log_n_opt <= log_n.max()), n_runs=len(log_n))


def fit_power_law(C, y) -> PowerLaw:
    """Least squares of ln y = ln k + exponent ln C."""
    exponent, log_k = np.polyfit(np.log(np.asarray(C, float)), np.log(np.asarray(y, float)), 1)
    return PowerLaw(coefficient=float(np.exp(log_k)), exponent=float(exponent))


def fit_isoflop(N, D, loss, C, *, rtol: float = 1e-2) -> IsoFlopFit:
    """Approach 2: one parabola per budget, then N_opt(C) and D_opt(C) as power laws."""
    N, D, loss, C = (np.asarray(x, dtype=float) for x in (N, D, loss, C))
    groups = group_by_budget(C, rtol)
    if len(groups) < 2:
        raise ValueError(f"approach 2 needs runs at 2 or more compute budgets; got {len(groups)}")
    minima = tuple(isoflop_minimum(float(np.exp(np.log(C[g]).mean())), N[g], D[g], loss[g]) for g in groups)
    budgets = [m.C for m in minima]
    return IsoFlopFit(minima=minima, N_opt=fit_power_law(budgets, [m.N_opt for m in minima]),
                      D_opt=fit_power_law(budgets, [m.D_opt for m in minima]))
