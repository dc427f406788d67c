"""Scaling-law fits (evolm.lab.scaling, ``evolm lab fit``) against published references: the
parameters of the Besiroglu et al. 2024 replication of Chinchilla (arXiv:2404.10102), Chinchilla's
own compute-optimal model, scipy's one-dimensional minimiser, and exact parabolas."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from evolm.cli import main
from evolm.lab.scaling import LossLaw, fit_isoflop, fit_loss_law, group_by_budget

# Besiroglu et al. 2024, eq. (the re-estimated Chinchilla law), arXiv:2404.10102.
REPLICATION = LossLaw(E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)


def _grid_points(noise: float, seed: int = 0):
    """An 8 x 8 grid over N 1e7..1e10 and D 1e9..1e12 with multiplicative log-normal noise."""
    N, D = (x.ravel() for x in np.meshgrid(np.logspace(7, 10, 8), np.logspace(9, 12, 8)))
    rng = np.random.default_rng(seed)
    return N, D, REPLICATION.loss(N, D) * np.exp(rng.normal(0.0, noise, N.size))


def _isoflop_points(law: LossLaw, budgets, per_budget: int = 9, spread: float = 1.0):
    """Runs along C = 6 N D around the law's optimum at each budget (the way IsoFLOP profiles are run)."""
    rows = []
    for C in budgets:
        centre = law.compute_optimal(C).N
        for N in centre * np.logspace(-spread, spread, per_budget):
            D = C / (6.0 * N)
            rows.append((N, D, float(law.loss(N, D)), C))
    return np.array(rows).T


def test_fit_recovers_the_replication_law_and_its_interval_covers_it():
    N, D, loss = _grid_points(noise=0.005)
    fit = fit_loss_law(N, D, loss, starts=32, bootstrap=40, seed=0)
    law = fit.law
    assert fit.n_points == 64
    assert law.alpha == pytest.approx(REPLICATION.alpha, rel=0.05)
    assert law.beta == pytest.approx(REPLICATION.beta, rel=0.05)
    assert law.E == pytest.approx(REPLICATION.E, rel=0.03)
    for name in ("E", "A", "B", "alpha", "beta"):
        lo, hi = fit.intervals[name]
        assert lo <= getattr(REPLICATION, name) <= hi, (name, lo, hi)
    assert fit.objective > 0 and len(fit.bootstrap) == 40
    again = fit_loss_law(N, D, loss, starts=32, bootstrap=40, seed=0)
    assert again.intervals == fit.intervals  # the seed fixes the resampling


def test_noise_free_points_are_fitted_exactly():
    N, D, loss = _grid_points(noise=0.0)
    law = fit_loss_law(N, D, loss, starts=16).law
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(law, name) == pytest.approx(getattr(REPLICATION, name), rel=1e-3), name


@pytest.mark.parametrize("flops_per_token", [6.0, 8.0])
@pytest.mark.parametrize("C", [1e18, 1e21, 1e24])
def test_closed_form_split_is_the_minimum_along_the_isoflop_curve(C, flops_per_token):
    """Reference: scipy's bounded scalar minimiser of L(N, C / (k N)) over ln N."""
    def loss_at(log_n):
        N = np.exp(log_n)
        return float(REPLICATION.loss(N, C / (flops_per_token * N)))

    numeric = minimize_scalar(loss_at, bounds=(np.log(1e3), np.log(1e15)), method="bounded",
                              options={"xatol": 1e-10})
    split = REPLICATION.compute_optimal(C, flops_per_token)
    assert split.N == pytest.approx(np.exp(numeric.x), rel=1e-5)
    assert split.D == pytest.approx(C / (flops_per_token * np.exp(numeric.x)), rel=1e-5)
    assert flops_per_token * split.N * split.D == pytest.approx(C, rel=1e-12)


def test_replication_law_gives_about_twenty_tokens_per_parameter():
    """Source: Besiroglu et al. 2024 (arXiv:2404.10102) report that their re-fitted approach-3 law,
    unlike Hoffmann's published one, agrees with Hoffmann's approaches 1 and 2 and so with the
    Chinchilla prescription of about 20 tokens per parameter; Chinchilla itself is 70B parameters
    on 1.4T tokens (Hoffmann et al. 2022), C = 6 * 70e9 * 1.4e12 = 5.88e23 FLOPs."""
    for C in (1e23, 3e23, 1e24):
        assert 15.0 < REPLICATION.compute_optimal(C).tokens_per_param < 25.0
    chinchilla = REPLICATION.compute_optimal(6 * 70e9 * 1.4e12)
    assert chinchilla.N == pytest.approx(70e9, rel=0.15)
    assert chinchilla.D == pytest.approx(1.4e12, rel=0.15)


def test_approach2_recovers_exponents_from_exact_parabolas():
    """Runs built on known parabolas whose minima follow N_opt = 0.1 C^0.52 along C = 6 N D."""
    rows = []
    for C in (1e18, 1e19, 1e20, 1e21):
        n_opt = 0.1 * C ** 0.52
        for N in n_opt * np.logspace(-0.6, 0.6, 7):
            rows.append((N, C / (6 * N), 2.0 + 10.0 * C ** -0.05 + 0.3 * np.log(N / n_opt) ** 2, C))
    N, D, loss, C = np.array(rows).T
    fit = fit_isoflop(N, D, loss, C)
    assert fit.N_opt.exponent == pytest.approx(0.52, abs=1e-9)
    assert fit.N_opt.coefficient == pytest.approx(0.1, rel=1e-7)
    assert fit.D_opt.exponent == pytest.approx(0.48, abs=1e-9)
    assert fit.D_opt.coefficient == pytest.approx(1 / 0.6, rel=1e-7)
    assert all(m.inside_range and m.n_runs == 7 for m in fit.minima)


def test_approach2_on_the_replication_law_matches_its_closed_form_exponents():
    """IsoFLOP parabolas are an approximation of the true profile, so the exponents agree closely,
    not exactly, with a = beta / (alpha + beta) and b = alpha / (alpha + beta)."""
    N, D, loss, C = _isoflop_points(REPLICATION, (1e18, 1e19, 1e20, 1e21, 1e22))
    fit = fit_isoflop(N, D, loss, C)
    s = REPLICATION.alpha + REPLICATION.beta
    assert fit.N_opt.exponent == pytest.approx(REPLICATION.beta / s, abs=0.01)
    assert fit.D_opt.exponent == pytest.approx(REPLICATION.alpha / s, abs=0.01)
    for m in fit.minima:
        assert m.N_opt == pytest.approx(REPLICATION.compute_optimal(m.C).N, rel=0.05)


def test_budgets_are_grouped_despite_rounding():
    groups = group_by_budget([1e20, 1.001e20, 1e21, 0.999e20, 1.0004e21])
    assert [sorted(g.tolist()) for g in groups] == [[0, 1, 3], [2, 4]]


def test_isoflop_needs_a_curve_with_a_bottom():
    N = np.array([1e8, 2e8, 4e8, 1e8, 2e8, 4e8])
    C = np.array([1e19] * 3 + [1e20] * 3)
    with pytest.raises(ValueError, match="does not curve upwards"):
        fit_isoflop(N, C / (6 * N), np.array([3.0, 2.9, 2.7, 2.0, 1.9, 1.8]), C)


# --- the command ---------------------------------------------------------------------------------
def _write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows))
    return path


def test_cli_writes_fit_json_table_and_plots(tmp_path, capsys):
    N, D, loss, C = _isoflop_points(REPLICATION, (1e18, 1e19, 1e20, 1e21), per_budget=7)
    points = _write_csv(tmp_path / "points.csv", ["N", "D", "loss", "C"], zip(N, D, loss, C))
    out = tmp_path / "fit"
    main(["lab", "fit", "--points", str(points), "--out", str(out), "--bootstrap", "5", "--starts", "8",
          "--budget", "1e21", "--budget", "5.88e23", "--params", "without-embeddings"])
    rep = json.loads((out / "fit.json").read_text())
    assert rep["n_points"] == 28 and rep["params_counted"] == "without-embeddings"
    assert rep["alpha"] == pytest.approx(REPLICATION.alpha, rel=0.02)
    assert set(rep["intervals"]) == {"E", "A", "B", "alpha", "beta"}
    assert [b["C"] for b in rep["budgets"]] == [1e21, 5.88e23]
    assert 15 < rep["budgets"][1]["tokens_per_param"] < 25
    assert len(rep["approach2"]["minima"]) == 4
    assert {p.name for p in out.glob("*.png")} == {"surface.png", "n_opt.png", "isoflop.png"}
    printed = capsys.readouterr().out
    assert "alpha" in printed and "D/N" in printed and "without-embeddings" in printed


def test_cli_reads_the_column_the_params_convention_names(tmp_path):
    N, D, loss = _grid_points(noise=0.0)
    points = _write_csv(tmp_path / "p.csv", ["N_with_embeddings", "N_without_embeddings", "D", "loss"],
                        zip(N, N / 2, D, loss))
    out = tmp_path / "fit"
    main(["lab", "fit", "--points", str(points), "--out", str(out), "--bootstrap", "0", "--starts", "8",
          "--no-plots"])
    assert json.loads((out / "fit.json").read_text())["alpha"] == pytest.approx(REPLICATION.alpha, rel=1e-3)


def test_cli_skips_approach2_when_the_runs_are_not_isoflop_curves(tmp_path, capsys):
    rng = np.random.default_rng(0)  # sizes and token counts drawn at random: no two runs share a budget
    N, D = 10 ** rng.uniform(7, 10, 30), 10 ** rng.uniform(9, 12, 30)
    points = _write_csv(tmp_path / "p.csv", ["N", "D", "loss", "C"], zip(N, D, REPLICATION.loss(N, D), 6 * N * D))
    out = tmp_path / "fit"
    main(["lab", "fit", "--points", str(points), "--out", str(out), "--bootstrap", "0", "--starts", "8",
          "--no-plots"])
    assert "needs at least 3 different N" in json.loads((out / "fit.json").read_text())["approach2"]["skipped"]
    assert "approach 2 (IsoFLOP) skipped" in capsys.readouterr().out


@pytest.mark.parametrize("header, rows, expected", [
    (["N", "D"], [(1e8, 1e10)], "missing column(s) ['loss']"),
    (["N", "D", "loss"], [(1e8, 1e10, 3.0), (1e8, "ten", 3.0)], "row 3, column 'D': expected a positive number, got 'ten'"),
    (["N", "D", "loss"], [(1e8, 1e10, -1.0)], "row 2, column 'loss': expected a positive number, got '-1.0'"),
    (["N", "D", "loss"], [(1e8, 1e10)], "row 2, column 'loss': expected a positive number, got None"),
    (["params", "D", "loss"], [(1e8, 1e10, 3.0)], "no column 'N'"),
    (["N", "D", "loss"], [], "no data rows"),
    (["N", "D", "loss"], [(1e8, 1e10, 3.0)], "needs at least 6 points; got 1"),
])
def test_cli_names_the_file_row_and_column_of_a_bad_csv(tmp_path, capsys, header, rows, expected):
    points = _write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(SystemExit) as exit_info:
        main(["lab", "fit", "--points", str(points), "--out", str(tmp_path / "o"), "--no-plots"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "bad.csv" in err


def test_cli_reports_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["lab", "fit", "--points", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")])
    assert "nope.csv: no such points file" in capsys.readouterr().err


def test_a_degenerate_law_has_no_optimum_and_intervals_skip_it():
    """A refit where loss rises with N (alpha < 0) has no interior optimum: NaN, not a complex number."""
    import math

    from evolm.lab.scaling import LossLaw, _percentiles

    bad = LossLaw(E=1.0, A=5.0, B=10.0, alpha=-0.1, beta=0.3).compute_optimal(1e18)
    assert math.isnan(bad.N) and math.isnan(bad.D)
    assert _percentiles([1.0, 2.0, math.nan, 3.0], 0.5) == (1.5, 2.5)
    assert all(math.isnan(x) for x in _percentiles([math.nan], 0.9))
