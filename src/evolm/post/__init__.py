"""Post-training: supervised fine-tuning, LoRA / QLoRA adapters, DPO-family preference losses and GRPO.

The seeds' "training trinity": pretraining gives a base model, SFT on prompt/response pairs an
instruct model, and alignment (RLHF, DPO, GRPO) an assistant. Every trainer here runs on the one
step loop of :mod:`evolm.train.loop`, the loop pretraining uses.
"""


def module_main(prog: str, description: str, add_args, run, argv=None, errors=(ValueError, FileNotFoundError)) -> None:
    """``python -m evolm.post.<trainer>``: the same flags and run as the ``evolm`` subcommand, and a
    one-line ``prog: error: ...`` instead of a traceback for the errors the trainer raises on bad input."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description)
    add_args(p)
    args = p.parse_args(argv)
    try:
        run(args)
    except errors as e:
        raise SystemExit(f"{prog}: error: {e}") from None
