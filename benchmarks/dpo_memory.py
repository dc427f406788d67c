"""Peak memory of one DPO step (forward + backward) on the 4 longest dpo_en_demo training pairs
(8 rows x 768 tokens, SmolLM2-135M-Instruct, fp32, one thread): completion log-probs through the
fused, chunked head (``nn.loss.fused_linear_logprobs``, what evolm uses) vs all logits + log_softmax
(what a plain implementation, TRL's included, keeps for the backward). Run each mode in its own
process, since peak RSS only grows:

    python benchmarks/dpo_memory.py fused
    python benchmarks/dpo_memory.py plain
"""
import resource, sys, time, torch
from evolm.interop.gguf import find_asset, load_gguf
from evolm.post.data import load_preferences
from evolm.post.dpo import encode_pairs, collate_pairs, preference_loss
import evolm.post.logprobs as L

mode = sys.argv[1]
torch.set_num_threads(1)
model, tok = load_gguf(find_asset("smollm2"), dtype=torch.float32)
enc, _ = encode_pairs(tok, load_preferences("dpo_en_demo", "train", None), 768)
rows = sorted(enc, key=lambda r: -max(len(r["chosen_ids"]), len(r["rejected_ids"])))[:4]
b = collate_pairs(rows, 0)
if mode == "plain":  # the previous path: all logits from the first completion column, log_softmax, gather
    class Wrap(torch.nn.Module):
        def __init__(s, m): super().__init__(); s.m = m
        def forward(s, ids, **kw): return s.m(ids, **kw)
    fwd = Wrap(model)
else:
    fwd = model
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.time()
lp, n = L.sequence_logprobs(fwd, b["input_ids"], b["completion_mask"])
B = len(rows)
loss = preference_loss(lp[:B], lp[B:], lp[:B].detach() - 1, lp[B:].detach(), beta=0.1).losses.mean()
loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{mode}: rows {tuple(b['input_ids'].shape)}, loss {loss.item():.4f}, peak RSS {peak:.0f} MiB "
      f"(after loading {base:.0f} MiB), {time.time() - t:.1f} s")
