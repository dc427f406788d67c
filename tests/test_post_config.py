"""Typed post-training configs: the flags are derived from the fields, their defaults are the
config's defaults, and a bad value fails at construction naming the field and its flag."""

from __future__ import annotations

import dataclasses

import pytest

from evolm.post.common import AdapterConfig, LoopOptions
from evolm.post.dpo import DPOConfig, DPOOptions
from evolm.post.flags import flat, parse
from evolm.post.grpo import GRPOConfig, GRPOOptions
from evolm.post.sft import SFTConfig

REQUIRED = {SFTConfig: {"model": "m", "data": "d"}, DPOConfig: {"model": "m", "data": "d"},
            GRPOConfig: {"model": "m", "task": "arith"}}


def _argv(required: dict) -> list[str]:
    return [x for k, v in required.items() for x in ("--" + k, v)]


@pytest.mark.parametrize("cls", list(REQUIRED))
def test_flag_defaults_are_the_config_defaults(cls):
    """Parsing only the required flags gives the config built in code from the same values."""
    assert parse(cls, _argv(REQUIRED[cls])) == cls(**REQUIRED[cls])


def test_flags_fill_sections_and_keep_their_names():
    c = parse(GRPOConfig, _argv(REQUIRED[GRPOConfig]) + [
        "--prompts-per-step", "3", "--no-chat", "--no-scale-rewards", "--reward-fn", "a:f", "--reward-fn", "b:g",
        "--lora", "--lora-r", "4", "--steps", "7", "--lr", "0.01"])
    assert c.objective == GRPOOptions(prompts_per_step=3, chat=False, scale_rewards=False)
    assert c.reward_fn == ("a:f", "b:g")
    assert c.adapter == AdapterConfig(lora=True, lora_r=4)
    assert c.loop == LoopOptions(steps=7, lr=0.01)
    assert parse(GRPOConfig, _argv(REQUIRED[GRPOConfig])).loop.steps == 50  # grpo's own default
    d = parse(DPOConfig, _argv(REQUIRED[DPOConfig]) + ["--loss", "simpo"])
    assert d.objective.beta is None and d.objective.loss_beta == 2.0  # the loss's usual beta
    assert flat(d)["loss"] == "simpo" and flat(d)["lora_r"] == 16


def test_unique_field_names_across_sections():
    for cls in REQUIRED:
        names = list(flat(cls(**REQUIRED[cls])))
        assert len(names) == len(set(names)), cls


@pytest.mark.parametrize("make, match", [
    (lambda: SFTConfig(model="m", data="d", batch_size=0), r"SFTConfig\.batch_size \(--batch-size\): must be >= 1"),
    (lambda: SFTConfig(model="m", data="d", val_fraction=1.0), r"SFTConfig\.val_fraction \(--val-fraction\)"),
    (lambda: DPOOptions(loss="dpo", reference="none"), r"DPOOptions\.reference \(--reference\)"),
    (lambda: DPOOptions(beta=0.0), r"--beta must be > 0"),
    (lambda: GRPOOptions(temperature=0.0), r"GRPOOptions\.temperature \(--temperature\): --temperature must be > 0"),
    (lambda: GRPOConfig(model="m", task="t", reward_weights="1,x"), r"GRPOConfig\.reward_weights"),
    (lambda: LoopOptions(accum=0), r"LoopOptions\.accum \(--accum\)"),
    (lambda: AdapterConfig(lora=True, lora_r=0), r"AdapterConfig\.lora_r \(--lora-r\)"),
    (lambda: AdapterConfig(qlora=True, lora_targets="lm_head"), r"field 'targets'"),
])
def test_bad_values_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_configs_are_frozen():
    c = SFTConfig(model="m", data="d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0  # type: ignore[misc]
    assert dataclasses.replace(c, lr=1.0).peak_lr == 1.0 and c.peak_lr == 2e-5
    assert dataclasses.replace(c, adapter=AdapterConfig(lora=True)).peak_lr == 2e-4


def test_module_entry_point_reports_a_bad_value_in_one_line(capsys):
    from evolm.post.dpo import main

    with pytest.raises(SystemExit, match=r"evolm dpo: error: DPOOptions\.batch_size \(--batch-size\)"):
        main(["--model", "m", "--data", "d", "--batch-size", "0"])


def test_cli_subcommands_take_the_derived_flags():
    from evolm.cli import build_parser

    args = build_parser().parse_args(["sft", "--model", "m", "--data", "d", "--lora", "--packing"])
    assert args.lora and args.packing and args.lora_targets == "q_proj,v_proj"
