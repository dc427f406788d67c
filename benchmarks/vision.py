"""Llama 3.2-Vision-style model speed on CPU: evolm vs transformers' Mllama, same random weights.

One process, one config (a small model of the 11B's shape: 4 tiles of 224 px, 14 px patches,
1,028 image tokens per image; text 8 layers of 512 with cross-attention at 3 and 7). Each engine
is timed interleaved ``--repeat`` times; prints the median seconds of

- ``encode``: the image encoder + projector for one image (evolm ``encode_images``; transformers'
  ``vision_model`` + ``multi_modal_projector``),
- ``generate``: a 32-token prompt with the image, then ``--new`` greedy tokens with the cache
  (evolm: its forward with a ``KVCache`` and the image's ``CrossCache``; transformers: ``generate``),

the ratio transformers / evolm, and whether the tokens agree.

    OMP_NUM_THREADS=1 python benchmarks/vision.py [--repeat 3] [--new 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(seed: int = 0):
    import transformers

    from evolm.config import ModelConfig, VisionConfig
    from evolm.interop.families.mllama import state_dict_from_hf
    from evolm.model import Transformer

    V = 32000
    vision = transformers.MllamaVisionConfig(
        hidden_size=256, num_hidden_layers=8, num_global_layers=2, attention_heads=4, intermediate_size=1024,
        vision_output_dim=768, image_size=224, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[3, 7])
    text = transformers.MllamaTextConfig(
        vocab_size=V, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=1408, cross_attention_layers=[3, 7], max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    ref = transformers.MllamaForConditionalGeneration(
        transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=V)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gate"):
                p.fill_(0.5)  # open every gate, so the image reaches the text
    c = ModelConfig(vocab_size=V, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, d_ff=1408, max_seq_len=256,
                    norm="rmsnorm", pos_emb="rope", rope_theta=500000.0, mlp="glu", activation="silu", mlp_bias=False,
                    tie_embeddings=False,
                    vision=VisionConfig(d_model=256, n_layers=8, n_global_layers=2, n_heads=4, d_ff=1024, image_size=224,
                                        patch_size=14, intermediate_layers=(3, 7), cross_attention_layers=(3, 7),
                                        image_token_id=V))
    ours = Transformer(c).eval()
    ours.load_state_dict(state_dict_from_hf(ref.state_dict()))
    return ref, ours


def inputs(V: int, T: int = 32):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (1, T), generator=g)
    ids[0, 0] = V
    return ids, dict(pixel_values=torch.randn(1, 1, 4, 3, 224, 224, generator=g), aspect_ratio_ids=torch.tensor([[6]]),
                     aspect_ratio_mask=torch.ones(1, 1, 4, dtype=torch.long),
                     cross_attention_mask=torch.ones(1, T, 1, 4, dtype=torch.long))


def ours_generate(model, ids, images, n_new):
    from evolm.cache import KVCache

    xm = images["cross_attention_mask"]
    img = {k: v for k, v in images.items() if k != "cross_attention_mask"}
    cache, cross = KVCache(1, ids.shape[1] + n_new), model.encode_images(**img)
    tok = model(ids, cache=cache, cross=cross, cross_attention_mask=xm, last_only=True)[:, -1].argmax(-1, keepdim=True)
    out = [tok]
    for _ in range(n_new - 1):
        tok = model(tok, cache=cache, cross=cross, cross_attention_mask=xm[:, -1:], last_only=True)[:, -1]
        tok = tok.argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ref, ours = build()
    V = ours.config.vocab_size
    ids, images = inputs(V)
    img = {k: v for k, v in images.items() if k != "cross_attention_mask"}
    runs = {
        "encode/evolm": lambda: ours.encode_images(**img),
        "encode/transformers": lambda: ref.model.multi_modal_projector(ref.model.vision_model(**img).last_hidden_state),
        "generate/evolm": lambda: ours_generate(ours, ids, images, a.new),
        "generate/transformers": lambda: ref.generate(input_ids=ids, **images, max_new_tokens=a.new, do_sample=False,
                                                      min_new_tokens=a.new)[:, ids.shape[1]:],
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    outs = {}
    with torch.no_grad():
        for _ in range(a.repeat):
            for k, f in runs.items():
                t = time.perf_counter()
                outs[k] = f()
                times[k].append(time.perf_counter() - t)
    print(f"torch {torch.__version__}, {a.threads} thread(s), {a.repeat} runs each (median)")
    for what in ("encode", "generate"):
        e, h = statistics.median(times[f"{what}/evolm"]), statistics.median(times[f"{what}/transformers"])
        print(f"{what:9s} evolm {e:7.3f} s   transformers {h:7.3f} s   transformers/evolm {h / e:5.2f}x")
    print("tokens equal:", torch.equal(outs["generate/evolm"], outs["generate/transformers"]))


if __name__ == "__main__":
    main()
