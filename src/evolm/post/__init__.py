"""Post-training: supervised fine-tuning, LoRA / QLoRA adapters, DPO-family preference losses and GRPO.

The seeds' "training trinity": pretraining gives a base model, SFT on prompt/response pairs an
instruct model, and alignment (RLHF, DPO, GRPO) an assistant. Every trainer here runs on the one
step loop of :mod:`evolm.train.loop`, the loop pretraining uses.
"""
