"""Plots of a scaling-law fit (matplotlib, Agg backend: files only, no display): the fitted loss
surface with the runs on it, N_opt(C) and D_opt(C), and the IsoFLOP curves with their minima."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _budget_range(points, budgets, flops_per_token: float) -> np.ndarray:
    C = points.C if points.C is not None else flops_per_token * points.N * points.D
    lo, hi = np.log10(min(C.min(), *budgets)), np.log10(max(C.max(), *budgets))
    return np.logspace(lo - 0.5, hi + 0.5, 100)


def plot_surface(path: Path, points, fit, budgets, flops_per_token: float) -> None:
    """Contours of the fitted L(N, D) over the runs' range, the runs coloured by observed loss on the
    same scale, and the compute-optimal path through the plane."""
    plt = _pyplot()
    log_n = np.linspace(np.log10(points.N.min()) - 0.3, np.log10(points.N.max()) + 0.3, 120)
    log_d = np.linspace(np.log10(points.D.min()) - 0.3, np.log10(points.D.max()) + 0.3, 120)
    grid_n, grid_d = np.meshgrid(log_n, log_d)
    surface = fit.law.loss(10 ** grid_n, 10 ** grid_d)
    levels = np.linspace(min(surface.min(), points.loss.min()), max(points.loss.max(), np.percentile(surface, 90)), 20)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    filled = ax.contourf(grid_n, grid_d, surface, levels=levels, cmap="viridis", extend="both")
    ax.scatter(np.log10(points.N), np.log10(points.D), c=points.loss, cmap="viridis", norm=filled.norm,
               edgecolors="white", linewidths=0.8, zorder=3, label="runs (observed loss)")
    path_c = _budget_range(points, budgets, flops_per_token)
    split = [fit.law.compute_optimal(C, flops_per_token) for C in path_c]
    ax.plot(np.log10([s.N for s in split]), np.log10([s.D for s in split]), "r-", label="compute-optimal N, D")
    ax.set_xlim(log_n[0], log_n[-1])
    ax.set_ylim(log_d[0], log_d[-1])
    fig.colorbar(filled, ax=ax, label="fitted loss")
    ax.set_xlabel("log10 N (parameters)")
    ax.set_ylabel("log10 D (tokens)")
    ax.set_title("L(N, D) = E + A/N^α + B/D^β")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_allocation(path: Path, points, fit, isoflop, budgets, flops_per_token: float) -> None:
    """N_opt(C) and D_opt(C) from the fitted law, the approach-2 minima where present, the budgets."""
    plt = _pyplot()
    C = _budget_range(points, budgets, flops_per_token)
    split = [fit.law.compute_optimal(c, flops_per_token) for c in C]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.loglog(C, [s.N for s in split], "C0-", label="N_opt (approach 3)")
    ax.loglog(C, [s.D for s in split], "C1-", label="D_opt (approach 3)")
    if isoflop is not None:
        ax.loglog(C, isoflop.N_opt(C), "C0--", label=f"N_opt ∝ C^{isoflop.N_opt.exponent:.3f} (approach 2)")
        ax.loglog(C, isoflop.D_opt(C), "C1--", label=f"D_opt ∝ C^{isoflop.D_opt.exponent:.3f} (approach 2)")
        ax.loglog([m.C for m in isoflop.minima], [m.N_opt for m in isoflop.minima], "C0o")
        ax.loglog([m.C for m in isoflop.minima], [m.D_opt for m in isoflop.minima], "C1o")
    for b in budgets:
        ax.axvline(b, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(f"compute C (FLOPs, C = {flops_per_token:g} N D)")
    ax.set_ylabel("parameters / tokens")
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_isoflop(path: Path, points, isoflop) -> None:
    """Loss against N for each budget, the fitted parabola in ln N and its minimum."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    colours = plt.cm.plasma(np.linspace(0.0, 0.85, len(isoflop.minima)))
    for m, colour in zip(isoflop.minima, colours):
        in_group = np.abs(np.log(points.C / m.C)) < 0.05
        n = points.N[in_group]
        ax.semilogx(n, points.loss[in_group], "o", color=colour, label=f"C = {m.C:.2g}")
        log_n = np.linspace(np.log(n.min()), np.log(n.max()), 100)
        ax.semilogx(np.exp(log_n), np.polyval(m.parabola, log_n), "-", color=colour)
        ax.semilogx([m.N_opt], [m.loss_min], "k*", markersize=10)
    ax.set_xlabel("N (parameters)")
    ax.set_ylabel("loss")
    ax.set_title("IsoFLOP curves; ★ = fitted minimum")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(out: Path, points, fit, isoflop, budgets, flops_per_token: float) -> list[Path]:
    written = [out / "surface.png", out / "n_opt.png"]
    plot_surface(written[0], points, fit, budgets, flops_per_token)
    plot_allocation(written[1], points, fit, isoflop, budgets, flops_per_token)
    if isoflop is not None:
        written.append(out / "isoflop.png")
        plot_isoflop(written[-1], points, isoflop)
    return written
