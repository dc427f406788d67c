"""llama.cpp as a peer in the decode benchmarks: several sequences decoded together, and bandwidth.

llama-cpp-python's ``Llama`` decodes one sequence, so batch 8 would have no llama.cpp row. This
drives llama.cpp's own batch API (``llama_batch`` with one sequence id per row, a context with
``n_seq_max`` sequences), as its ``llama-batched-bench`` tool does: the prompts of all sequences in
one ``llama_decode``, then one token per sequence per step, greedy, the logits of every row read
back. The file's quantized kernels run, as in any llama.cpp program.

The bandwidth helpers say what one decode step must read (each weight it multiplies once, the KV
cache at the average length) and what the host can read, so a decode rate can be put against the
memory system: tokens/s x bytes/token / batch = GB/s.
"""

from __future__ import annotations

import time

import numpy as np
import torch


class LlamaCppBatch:
    """One llama.cpp context for ``batch`` sequences of up to ``n_ctx`` tokens each, on ``path``."""

    def __init__(self, path: str, batch: int, n_ctx: int, threads: int):
        import llama_cpp as L

        self.L, self.batch = L, batch
        self._quiet = L.llama_log_callback(lambda level, text, data: None)  # kept: C holds the pointer
        L.llama_log_set(self._quiet, None)  # its load and graph messages would bury the table
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = L.llama_context_default_params()
        cparams.n_ctx = batch * n_ctx
        cparams.n_batch = cparams.n_ctx  # every prompt in one llama_decode call
        cparams.n_ubatch = 512
        cparams.n_seq_max = batch
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self._batch = L.llama_batch_init(cparams.n_ctx, 0, batch)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows: (token, position, sequence, want logits)."""
        b = self._batch
        b.n_tokens = len(rows)
        for j, (tok, pos, seq, out) in enumerate(rows):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, pos, 1, out
            b.seq_id[j][0] = seq
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        return int(np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)).argmax())

    def run(self, ids: torch.Tensor, new: int) -> tuple[float, float, list[list[int]]]:
        """Greedy ``new`` tokens for each row of ``ids`` (batch, length): (prefill tok/s, decode tok/s
        beyond the first token, the tokens)."""
        batch, length = ids.shape
        assert batch == self.batch, (batch, self.batch)
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        prompt = ids.tolist()
        t = time.perf_counter()
        self._decode([(tok, p, s, p == length - 1) for s in range(batch) for p, tok in enumerate(prompt[s])])
        out = [[self._argmax(s * length + length - 1)] for s in range(batch)]
        prefill = batch * length / (time.perf_counter() - t)
        t = time.perf_counter()
        for step in range(new - 1):
            self._decode([(out[s][-1], length + step, s, True) for s in range(batch)])
            for s in range(batch):
                out[s].append(self._argmax(s))
        return prefill, batch * (new - 1) / (time.perf_counter() - t), out

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self._batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


def gguf_step_bytes(path: str, batch: int, cache_len: float) -> float:
    """Bytes llama.cpp reads for one decode step of ``batch`` sequences: every tensor of the file once
    (the token embedding only when it is also the head, i.e. there is no ``output.weight``) and an
    f16 KV cache (its default) of every sequence at ``cache_len`` positions."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    if "output.weight" in sizes:
        sizes.pop("token_embd.weight", None)
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")

    def field(key: str) -> int:
        f = r.fields[f"{arch}.{key}"]
        return int(f.parts[f.data[0]][0])

    layers, heads = field("block_count"), field("attention.head_count")
    kv_heads = field("attention.head_count_kv") if f"{arch}.attention.head_count_kv" in r.fields else heads
    key_len = field("attention.key_length") if f"{arch}.attention.key_length" in r.fields \
        else field("embedding_length") // heads
    kv = 2 * layers * kv_heads * key_len * 2 * cache_len  # K and V, f16
    return sum(sizes.values()) + batch * kv


def model_step_bytes(model, batch: int, cache_len: float, kv_bytes: int = 4) -> float | None:
    """Bytes one evolm decode step reads: the kept blocks of each ``BlockLinear`` (codes, scales,
    minima), every float weight it multiplies (the embedding only as a tied head: a lookup reads
    one row) and the KV cache at ``cache_len``. None for other quantized layers (own layouts)."""
    from evolm.analysis.cost import cost_card
    from evolm.quant.blocks import BlockEmbedding, BlockLinear

    # tensors by storage: a tied head's blocks are the blocks embedding's, loaded as other tensor objects
    total, seen = 0, set()
    for mod in model.modules():
        if isinstance(mod, BlockLinear):
            if mod.codes.data_ptr() not in seen:
                total += mod.blocks.bytes()
            total += mod.bias.numel() * mod.bias.element_size() if mod.bias is not None else 0
            seen.update(t.data_ptr() for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)))
    for mod in model.modules():
        if isinstance(mod, BlockEmbedding):  # a lookup reads one row per token
            seen.update(t.data_ptr() for t in mod.buffers(recurse=False))
    tables = [t for t in (model.embed_tokens, getattr(model, "pos_embed", None)) if isinstance(t, torch.nn.Embedding)]
    if model.lm_head is None:  # the head is the embedding table: read whole every step
        tables = tables[1:]
    seen.update(t.weight.data_ptr() for t in tables)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        if t.dtype in (torch.int8, torch.uint8, torch.int32):
            return None
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    kv = cost_card(model.config, max(1, int(cache_len)), bytes_per_value=kv_bytes)["kv_cache_bytes_at_context"]
    return total + batch * kv


def host_bandwidth(threads: int, mib: int = 1024, repeat: int = 5) -> tuple[float, float]:
    """(read GB/s, copy GB/s) of this host with ``threads`` threads, best of ``repeat``: a sum over a
    ``mib`` MiB float32 tensor (bytes read), and a copy of half of it (STREAM's convention: bytes
    read + written)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(mib * 2**20 // 4)
        half = x[: x.numel() // 2]
        dst = torch.empty_like(half)

        def best(fn) -> float:
            fn()
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return min(times)

        read = x.numel() * 4 / best(lambda: x.sum()) / 1e9
        copy = 2 * half.numel() * 4 / best(lambda: dst.copy_(half)) / 1e9
        return read, copy
    finally:
        torch.set_num_threads(old)
