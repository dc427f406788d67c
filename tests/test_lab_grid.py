"""``evolm lab scaling``: the IsoFLOP grid (lab/grid.py) spends each budget on every size and
hands its runs to the fit (lab/fit_command.py, itself checked on synthetic points in
tests/test_lab_scaling.py)."""

import csv
import json

import pytest

from evolm.analysis.cost import cost_card
from evolm.lab.budget import TOLERANCE
from evolm.lab.grid import Size, parse_budgets, parse_sizes, plan_grid


def test_sizes_and_budgets_parse_or_say_what_is_wrong():
    assert parse_sizes("64x2, 128x4") == [Size(64, 2), Size(128, 4)]
    assert Size(96, 3).overrides() == {"d_model": 96, "n_layers": 3, "n_heads": 3, "n_kv_heads": 3,
                                       "head_dim": 32, "d_ff": 384}
    assert parse_budgets("3e12,1e12") == [1e12, 3e12]
    for bad, msg in (("64", "D_MODELxN_LAYERS"), ("70x2", "multiple of 32"), ("ax2", "D_MODELxN_LAYERS")):
        with pytest.raises(ValueError, match=msg):
            parse_sizes(bad)
    with pytest.raises(ValueError, match="positive"):
        parse_budgets("1e12,-1")


def test_every_cell_spends_its_budget():
    from pathlib import Path

    import yaml

    class Vocab:
        vocab_size = 4096

    from evolm.lab.ablate import _config

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "lab-base.yaml").read_text())
    cells = plan_grid(base, parse_sizes("32x2,64x2,96x3,128x4,160x4"), [1.5e12, 4e12, 1e13], Vocab, lambda s: None)
    assert len(cells) == 15
    for size, c, recipe, card in cells:
        config = _config(recipe, Vocab)
        assert config.d_model == size.d_model and config.n_layers == size.n_layers
        per_token = cost_card(config, context_len=128)["flops_per_token"]
        assert card["tokens"] * per_token == card["flops"]
        assert abs(card["flops"] - c) / c <= TOLERANCE


@pytest.mark.slow
def test_grid_trains_every_cell_and_fits_the_runs(tmp_path):
    import argparse

    from test_lab_ablate import _tiny_recipe

    from evolm.lab.grid import run_scaling

    base = tmp_path / "base.yaml"
    import yaml

    base.write_text(yaml.safe_dump(_tiny_recipe(tmp_path)))
    args = argparse.Namespace(base=str(base), sizes="32x1,64x1,64x2", budgets="5e9,1.2e10", out=str(tmp_path / "s"),
                              seed=0, jobs=1, data_dir=None, fit_budget=[], params="with-embeddings", bootstrap=5)
    rep = run_scaling(args)
    rows = list(csv.DictReader(open(tmp_path / "s" / "points.csv")))
    assert len(rows) == 6 and {r["size"] for r in rows} == {"d32x1", "d64x1", "d64x2"}
    for r in rows:
        summary = json.loads((tmp_path / "s" / r["size"] / f"C-{float(r['C']):.3g}" / "seed-0" / "summary.json")
                             .read_text())
        assert float(r["loss"]) == summary["val_loss"]
        assert int(r["N_without_embeddings"]) < int(r["N_with_embeddings"])
    fit = json.loads((tmp_path / "s" / "fit" / "fit.json").read_text())
    assert fit == json.loads(json.dumps(rep)) and [b["C"] for b in fit["budgets"]] == [1.2e10, 1.2e11]
    with pytest.raises(ValueError, match="needs more runs"):
        run_scaling(argparse.Namespace(**{**vars(args), "sizes": "32x1", "budgets": "5e9"}))
