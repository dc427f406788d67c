"""The parallel layout (parallel/layout.py): resolution against the world, errors naming the field,
the DeviceMesh and its flattened groups, the recipe's ``parallel:`` section and the CLI flags."""

from __future__ import annotations

import pytest

from ranks import run_ranks

from evolm.parallel.layout import LayoutError, ParallelLayout, effective_layout, layout_from_dict
from evolm.train.recipe import RecipeError, apply_parallel_flags, recipe_from_dict


def test_rest_of_world_and_products():
    assert ParallelLayout().resolve(8).dp_shard == 8
    r = ParallelLayout(tp=2, pp=2).resolve(8)
    assert (r.dp_shard, r.tp, r.pp, r.world, r.dp) == (2, 2, 2, 8, 2)
    r = ParallelLayout(dp_shard=2, dp_replicate=-1, tp=2).resolve(8)
    assert (r.dp_replicate, r.dp) == (2, 4)
    assert ParallelLayout(dp_shard=2, tp=2).resolve(4).describe() == "dp_shard 2 x tp 2"


@pytest.mark.parametrize("layout, world, match", [
    (ParallelLayout(dp_shard=2, tp=3), 8, r"dp_shard 2 x tp 3 multiply to 6, but 8 processes"),
    (ParallelLayout(tp=3), 8, r"tp 3 \(product 3\) does not divide the world size 8; parallel.dp_shard=-1"),
    (ParallelLayout(dp_shard=2, ep=4), 2, r"parallel.ep=4 must divide dp_shard x cp = 2 x 1"),
    (ParallelLayout(dp_shard=4, cp=2, ep=3), 8, r"parallel.ep=3 must be a multiple of parallel.cp=2"),
])
def test_resolution_errors_name_the_field(layout, world, match):
    with pytest.raises(LayoutError, match=match):
        layout.resolve(world)


def test_field_errors():
    with pytest.raises(LayoutError, match="only one field may be -1"):
        ParallelLayout(dp_shard=-1, tp=-1)
    with pytest.raises(LayoutError, match="parallel.tp must be a positive integer"):
        ParallelLayout(tp=0)
    with pytest.raises(LayoutError, match="unknown key 'tensor'"):
        layout_from_dict({"tensor": 2})
    with pytest.raises(LayoutError, match="did you mean 'dp_shard'"):
        layout_from_dict({"dp_shards": 2})


def test_distributed_and_parallel_interplay():
    assert effective_layout("none", None, 4) is None  # torchrun without a layout: each process alone
    assert effective_layout("ddp", None, 4) == ParallelLayout(dp_shard=1, dp_replicate=4)
    assert effective_layout("fsdp", None, 4) == ParallelLayout(dp_shard=4)
    assert effective_layout("none", ParallelLayout(tp=2), 4) == ParallelLayout(dp_shard=2, tp=2)
    assert effective_layout("ddp", ParallelLayout(tp=2), 4) == ParallelLayout(dp_shard=1, dp_replicate=2, tp=2)
    assert effective_layout("fsdp", ParallelLayout(tp=2), 1 * 2) == ParallelLayout(dp_shard=1, tp=2)
    assert effective_layout("none", ParallelLayout(), 1) is None
    with pytest.raises(LayoutError, match="ddp keeps whole replicas, but parallel.dp_shard=2"):
        effective_layout("ddp", ParallelLayout(dp_shard=2), 4)
    with pytest.raises(LayoutError, match="fsdp, but parallel.dp_shard: 1 with dp_replicate"):
        effective_layout("fsdp", ParallelLayout(dp_shard=1, dp_replicate=4), 4)


def _recipe(**extra):
    d = {"model": "tiny-llama", "tokenizer": {"path": "tok.json"}, "data": {"sources": ["x"]}, **extra}
    return recipe_from_dict(d, "r.yaml")


def test_recipe_section_and_flags():
    assert _recipe().parallel is None
    r = _recipe(parallel={"tp": 2, "dp_shard": 2})
    assert r.parallel == ParallelLayout(tp=2, dp_shard=2)
    assert r.to_dict()["parallel"]["tp"] == 2
    assert recipe_from_dict({**r.to_dict()}, "again").parallel == r.parallel  # the run folder's recipe.yaml
    with pytest.raises(RecipeError, match="r.yaml: parallel: unknown key 'tpp'"):
        _recipe(parallel={"tpp": 2})
    with pytest.raises(RecipeError, match="r.yaml: train.distributed: ddp keeps whole replicas"):
        _recipe(parallel={"dp_shard": 2}, train={"distributed": "ddp"})
    r = apply_parallel_flags(_recipe(parallel={"dp_shard": 2}), tp=2, pp=None)
    assert r.parallel == ParallelLayout(dp_shard=2, tp=2)
    assert apply_parallel_flags(_recipe(), tp=None).parallel is None
    with pytest.raises(RecipeError, match="parallel.cp must be a positive integer"):
        apply_parallel_flags(_recipe(), cp=0)


def test_cli_flags_parse():
    from evolm.cli import build_parser

    args = build_parser().parse_args(["pretrain", "--config", "r.yaml", "--tp", "2", "--dp-shard", "-1", "--ep", "2"])
    assert (args.tp, args.dp_shard, args.ep, args.pp, args.cp, args.dp_replicate) == (2, -1, 2, None, None, None)


def _mesh_rank(rank, world, layout):
    from evolm.parallel.layout import ParallelLayout

    lay = ParallelLayout(**layout).resolve(world)
    mesh = lay.build_mesh("cpu")
    names = ["tp", "dp", "dp_shard_cp", "dp_cp"] + (["ep"] if lay.ep > 1 else [])
    return {n: (mesh[n].size(), mesh[n].get_local_rank()) for n in names}


def test_mesh_dims_and_flattened_groups():
    # 4 ranks as dp_shard 2 x tp 2: tp is innermost (ranks 0,1 share a tp group), dp strides by 2
    got = run_ranks(4, _mesh_rank, {"dp_shard": 2, "tp": 2})
    assert [g["tp"] for g in got] == [(2, 0), (2, 1), (2, 0), (2, 1)]
    assert [g["dp"] for g in got] == [(2, 0), (2, 0), (2, 1), (2, 1)]
    assert [g["dp_shard_cp"] for g in got] == [(2, 0), (2, 0), (2, 1), (2, 1)]
    # ep borrows the data-parallel ranks: dp_shard 4 with ep 2 -> ep groups of 2 inside dp_shard
    got = run_ranks(4, _mesh_rank, {"dp_shard": 4, "ep": 2})
    assert [g["dp"][0] for g in got] == [4] * 4 and [g["ep"][0] for g in got] == [2] * 4
    assert [g["ep"][1] for g in got] == [0, 1, 0, 1]


def test_a_sequence_the_layout_cannot_split_evenly_is_refused_with_its_stage():
    """cp cuts each sequence into 2 x cp zigzag chunks, tp each cp rank's part into tp: a stage
    whose seq_len does not split is named when the recipe is read, not by a collective mid-step."""
    stages = [{"name": "long", "seq_len": 250}]
    with pytest.raises(RecipeError, match=r"stages\[0\] \(long\): seq_len 250 must be a multiple of 2 x cp = 4"):
        _recipe(parallel={"cp": 2}, stages=stages)
    with pytest.raises(RecipeError, match=r"seq_len 36 must be a multiple of cp x tp = 8 .*each rank's 18 tokens"):
        _recipe(parallel={"cp": 2, "tp": 4}, stages=[{"seq_len": 36}])
    assert _recipe(parallel={"cp": 2, "tp": 2}, stages=[{"seq_len": 256}]).parallel.cp == 2
    with pytest.raises(RecipeError, match="multiple of 2 x cp = 4"):  # the flags are checked too
        apply_parallel_flags(_recipe(stages=[{"seq_len": 250}]), cp=2)
