"""Post-training: supervised fine-tuning, LoRA / QLoRA adapters, DPO-family preference losses and GRPO.

The seeds' "training trinity": pretraining gives a base model, SFT on prompt/response pairs an
instruct model, and alignment (RLHF, DPO, GRPO) an assistant. Every trainer here runs on the one
step loop of :mod:`evolm.train.loop`, the loop pretraining uses.

Each command is a frozen typed config and a run: ``run_sft(SFTConfig(...))``,
``run_dpo(DPOConfig(...))``, ``run_grpo(GRPOConfig(...))``, ``run_merge(MergeConfig(...))``; the
command-line flags are derived from the config's fields (:mod:`evolm.post.flags`), and what the
trainers share (loading the policy, LoRA options, run folder, final save, held-out report) is
:mod:`evolm.post.common`.
"""


def module_main(prog: str, description: str, config_class, run, argv=None,
                errors=(ValueError, FileNotFoundError)) -> None:
    """``python -m evolm.post.<trainer>``: the same flags and run as the ``evolm`` subcommand (flags ->
    ``config_class`` -> ``run(config)``), and a one-line ``prog: error: ...`` instead of a traceback
    for the errors a bad setting or bad input raises."""
    from evolm.post.flags import parse

    try:
        run(parse(config_class, argv, prog=prog, description=description))
    except errors as e:
        raise SystemExit(f"{prog}: error: {e}") from None
