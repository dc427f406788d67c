"""The ``evolm`` command: thin, one subcommand per verb; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn


def _fail(msg: str) -> NoReturn:
    print(f"evolm: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def resolve_config(spec: str):
    """A preset name, an evolm config JSON, or a Hugging Face config.json / model folder."""
    from evolm.loading import load_config

    return load_config(spec)


# --- arch ------------------------------------------------------------------------------------
def cmd_arch(args) -> None:
    from evolm.analysis import cost
    from evolm.presets import list_presets, get_preset

    if args.arch_cmd == "list":
        rows = []
        for name in list_presets():
            c = get_preset(name)
            card = cost.cost_card(c)
            rows.append((name, cost.human(card["params_total"]), cost.human(card["params_active"]),
                         c.meta.get("family", ""), c.meta.get("hf_id", "")))
        width = max(len(r[0]) for r in rows)
        print(f"{'preset':<{width}}  {'params':>8}  {'active':>8}  family    reference")
        for r in rows:
            print(f"{r[0]:<{width}}  {r[1]:>8}  {r[2]:>8}  {r[3]:<8}  {r[4]}")
    elif args.arch_cmd == "show":
        card = cost.cost_card(resolve_config(args.name), context_len=args.context)
        print(json.dumps(card, indent=2) if args.json else cost.format_card(card))
    elif args.arch_cmd == "compare":
        cards = [cost.cost_card(resolve_config(n), context_len=args.context) for n in args.names]
        print(json.dumps(cards, indent=2) if args.json else cost.compare_table(cards))
    elif args.arch_cmd == "diff":
        a, b = resolve_config(args.a), resolve_config(args.b)
        rows = cost.diff_configs(a, b)
        if args.json:
            print(json.dumps({k: [va, vb] for k, va, vb in rows}, indent=2, default=str))
            return
        if not rows:
            print(f"{args.a} and {args.b} have the same architecture")
        w = max((len(r[0]) for r in rows), default=0)
        print(f"{'field':<{w}}  {args.a}  ->  {args.b}")
        for k, va, vb in rows:
            print(f"{k:<{w}}  {va!r}  ->  {vb!r}")
    elif args.arch_cmd == "plan":
        _arch_plan(args)
    elif args.arch_cmd == "flatten":
        from evolm.lab.flatten import write_flat

        write_flat(resolve_config(args.name), args.out)
        print(f"wrote {args.out}: {args.name} as one PyTorch file (no evolm import)")


def _arch_plan(args) -> None:
    """``evolm arch plan``: per-GPU memory of a layout, and the layouts that fit."""
    from evolm.analysis import plan as planner

    gpu_mem = planner.parse_bytes(args.gpu_mem) if args.gpu_mem else None
    config = resolve_config(args.name)
    layout = planner.parse_layout(args.layout, args.gpus)
    p = planner.plan(config, layout, gpus=args.gpus, seq=args.seq, batch=args.batch, gpu_mem=gpu_mem,
                     dtype=args.dtype, optimizer=args.optimizer, loss=args.loss,
                     activation_checkpointing=args.activation_checkpointing, microbatches=args.microbatches,
                     schedule=args.pp_schedule)
    suggestions = None
    if gpu_mem and not args.no_suggest:
        suggestions = planner.suggest_layouts(config, args.gpus, gpu_mem, seq=p["seq"], batch=args.batch,
                                              dtype=args.dtype, optimizer=args.optimizer, loss=args.loss,
                                              microbatches=args.microbatches, schedule=args.pp_schedule,
                                              net=planner.Network(gpus_per_node=args.gpus_per_node))
    if args.json:
        print(json.dumps({**p, "suggestions": suggestions}, indent=2))
    else:
        print(planner.format_plan(p, suggestions))


def cmd_lab(args) -> None:
    import yaml

    from evolm.lab.ablate import parse_vary, report_text, run_ablation
    from evolm.lab.budget import Budget
    from evolm.lab.ladder import SIZES, rungs, sized

    ladder = args.lab_cmd == "ladder"
    try:
        base = yaml.safe_load(open(args.base))
        if not isinstance(base, dict):
            raise ValueError(f"{args.base}: expected a recipe mapping")
        if ladder:
            base = sized(base, args.size)
        budget = Budget.parse(args.budget or SIZES[args.size]["budget"] if ladder else args.budget)
        variants = rungs(args.rungs.split(",") if args.rungs else None, base) if ladder else parse_vary(args.vary)
        sweep = parse_vary(args.sweep) if args.sweep else None
        if args.seeds < 2:
            raise ValueError(f"--seeds {args.seeds}: a comparison needs at least 2 seeds per variant")
        if args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs}: expected 1 or more")
    except (OSError, ValueError, yaml.YAMLError) as e:
        _fail(f"lab {args.lab_cmd}: {e}")
    try:
        results = run_ablation(base, variants, list(range(args.seeds)), budget, args.out, data_dir=args.data_dir,
                               ladder=ladder, sweep=sweep, workers=args.jobs)
    except ValueError as e:
        _fail(f"lab {args.lab_cmd}: {e}")
    print(report_text(results))


def _add_lab_run_args(s) -> None:
    s.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="settings tried for every variant, each judged at its best (optim.lr=1e-3,3e-3)")
    s.add_argument("--jobs", type=int, default=1, help="runs at once, in separate processes sharing the cores")
    s.add_argument("--data-dir", default=None)
    s.set_defaults(func=cmd_lab)


# --- convert ---------------------------------------------------------------------------------
def cmd_convert(args) -> None:
    from evolm.loading import load, save

    if args.type is not None and args.to != "gguf":
        raise ValueError(f"--type {args.type}: only for --to gguf (--to {args.to} keeps the weights' dtype; see --dtype)")
    if args.to == "gguf" and not args.out.endswith(".gguf"):
        raise ValueError(f"--out {args.out}: a GGUF export is one file; name it *.gguf")
    model, tok = load(args.model, dtype=args.dtype)
    save(model, args.out, tokenizer=tok, fmt=args.to, gguf_type=args.type or "f16")
    print(f"wrote {args.to} model to {args.out}")


# --- quantize --------------------------------------------------------------------------------
def cmd_quantize(args) -> None:
    from evolm.quant import KernelPolicy
    from evolm.quant.calibration import CalibrationConfig
    from evolm.quant.gptq import GPTQConfig
    from evolm.quant.quantize import QuantizeConfig, run_quantize

    config = QuantizeConfig(args.method, args.group_size,
                            CalibrationConfig(tuple(args.calib_data), args.calib_samples, args.calib_len, args.seed),
                            GPTQConfig(args.group_size, args.damp, act_order=args.act_order))
    res = run_quantize(args.model, args.out, config, KernelPolicy.from_env(), log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {res['method']} model to {res['out']}: {res['bits_per_weight']} bits per quantized weight, "
          f"{res['file_bytes'] / 1e6:.1f} MB, {res['seconds']} s")


# --- prune -----------------------------------------------------------------------------------
def cmd_prune(args) -> None:
    if args.method == "minitron":  # structured: a smaller config, not zeros
        from evolm.prune import structured

        structured.run(args)
        return
    from evolm.prune.unstructured import prune_config_from_args, run_prune

    res = run_prune(args.model, args.out, prune_config_from_args(args), log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {res['method']} {res['sparsity']} model to {res['out']}: {res['zero_fraction']:.1%} of the block "
          f"linears' {res['weights']:,} weights are zero; pruning {res['prune_seconds']} s, "
          f"{res['seconds']} s in all")


# --- generate / chat / serve -----------------------------------------------------------------
DTYPES = ("float32", "bfloat16", "float16")
KEEP_BLOCKS_HELP = ("GGUF on CPU: keep the file's quantized blocks and compute with exactly the weights they encode "
                    "(the dense model's numbers, reading 5-10 bits per weight instead of 32 or 16)")


def _add_inference_args(p: argparse.ArgumentParser, decode_loop: bool = True) -> None:
    """The flags of :class:`evolm.infer.prepare.InferenceOptions` (generate, chat, serve).
    ``decode_loop``: the command decodes with evolm's own loop, so ``--compile`` applies."""
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantized linears for faster CPU decoding (int4: group 32, int8 head)")
    on_off = argparse.BooleanOptionalAction
    p.add_argument("--keep-blocks", action=on_off, default=None, help=KEEP_BLOCKS_HELP + " (default: on for GGUF on CPU)")
    p.add_argument("--fuse", action=on_off, default=None, help="one qkv and one gate_up matmul per layer (default: on)")
    if decode_loop:
        p.add_argument("--compile", action=on_off, default=None,
                       help="prefill and decode through torch.compile-d graphs over a static KV cache "
                            "(first call compiles; default: on for CUDA, off on CPU)")
    p.add_argument("--block-step", action=on_off, default=None,
                   help="on the CPU, each block's decode step as one C++ call (default: on for CPU unless --compile)")
    p.add_argument("--no-fast", dest="fast", action="store_false",
                   help="the plain eager model: no kept blocks, no fusing, no compiling")
    p.add_argument("--explain", action="store_true", help="print which inference path is used and why (stderr)")


def _inference_options(args):
    """The ``_add_inference_args`` flags as the library's typed options, every path choice made
    (``--explain`` prints them)."""
    from evolm.infer.prepare import InferenceOptions, choose_path
    from evolm.quant import KernelPolicy

    options = InferenceOptions(device=args.device, dtype=args.dtype, keep_blocks=args.keep_blocks, fuse=args.fuse,
                               quantize=args.quantize, compile=getattr(args, "compile", False), fast=args.fast,
                               block_step=args.block_step,
                               policy=KernelPolicy.from_env())  # the EVOLM_* kernel switches, read once
    options, why = choose_path(args.model, options)
    if args.explain:
        print("inference path:\n  " + "\n  ".join(why), file=sys.stderr)
    return options


def _load_for_generation(args):
    """``(model, tokenizer, options)`` for generate and chat."""
    import torch

    from evolm.infer.prepare import load_for_inference

    options = _inference_options(args)
    model, tok = load_for_inference(args.model, options)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    return model, tok, options


def _sampling(args, **extra):
    from evolm.infer.sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=tuple(args.stop or ()), ignore_eos=args.ignore_eos, **extra)


def cmd_generate(args) -> None:
    from evolm.infer.text import chat_prompt_ids, stream
    from evolm.quant import KernelPolicy

    model, tok, options = _load_for_generation(args)
    images = None
    if args.image:  # a vision model: the image's placeholders open the prompt (evolm.infer.vision)
        from evolm.infer.vision import image_prefix, load_images

        images = load_images(model, args.image)
    if args.chat:
        if not getattr(tok, "chat_template", None):
            _fail(f"{args.model}: the tokenizer has no chat template; drop --chat")
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        content = [{"type": "image"}, {"type": "text", "text": args.prompt}] if args.image else args.prompt
        ids = chat_prompt_ids(tok, messages + [{"role": "user", "content": content}])
        if args.image:  # the template writes one <|image|>; LLaVA-style fusion takes one per image state
            from evolm.infer.vision import expand_image_tokens

            ids = expand_image_tokens(model, ids)
    elif args.image:
        ids = image_prefix(model, tok) + tok.encode(args.prompt, add_special_tokens=False)
    else:
        ids = tok.encode(args.prompt)
    for piece in stream(model, tok, ids, _sampling(args), compile=options.compile,
                            policy=options.policy, images=images):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args) -> None:
    from evolm.infer.text import chat_prompt_ids, stream
    from evolm.quant import KernelPolicy

    model, tok, options = _load_for_generation(args)
    if not getattr(tok, "chat_template", None):
        _fail(f"{args.model}: the tokenizer has no chat template; use `evolm generate` instead")
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("evolm chat: empty line or /exit to quit, /reset to clear the history", file=sys.stderr)
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if user in ("", "/exit", "/quit"):
            break
        if user == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": user})
        sys.stdout.write("assistant> ")
        reply = []
        for piece in stream(model, tok, chat_prompt_ids(tok, history), _sampling(args), compile=options.compile,
                            policy=options.policy):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_serve(args) -> None:
    from evolm.serve import run_server

    options = _inference_options(args)  # a device that is not there: an error before loading
    run_server(args.model, inference=options, host=args.host, port=args.port, api_key=args.api_key,
               max_batch=args.max_batch, max_model_len=args.max_model_len,
               served_model_name=args.served_model_name, min_decode_rows=args.min_decode_rows,
               log_level=args.log_level, threads=args.threads, max_body_bytes=args.max_body_bytes)


# --- pretrain / data / tokenizer ---------------------------------------------------------------
def cmd_pretrain(args) -> None:
    from evolm.train.pretrain import pretrain
    from evolm.train.recipe import apply_parallel_flags, load_recipe

    recipe = apply_parallel_flags(load_recipe(args.config), dp_shard=args.dp_shard, dp_replicate=args.dp_replicate,
                                  tp=args.tp, pp=args.pp, cp=args.cp, ep=args.ep)
    summary = pretrain(recipe, out_dir=args.out, resume=args.resume, data_dir=args.data_dir,
                       stop_after_steps=args.stop_after)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))


def cmd_checkpoint(args) -> None:
    from evolm.parallel.checkpoint import consolidate

    out = consolidate(args.step, args.out)
    print(f"wrote {out / 'model.safetensors'}")


def cmd_data(args) -> None:
    if args.data_cmd == "install":
        if args.post:
            from evolm.post.data import install_post_data

            install_post_data(args.data_dir, force=args.force)
            return
        from evolm.data.corpora import install_all

        install_all(args.data_dir, names=args.names or None, force=args.force)
        return
    if args.data_cmd == "synthesize":
        import torch

        from evolm.data.synthesize import config_from_args, synthesize

        config = config_from_args(args)
        config.check()  # a bad flag is named before the model loads
        torch.set_num_threads(args.threads or torch.get_num_threads())
        try:
            manifest = synthesize(config, _inference_options(args), log=lambda m: print(m, file=sys.stderr))
        except KeyboardInterrupt:
            _fail(f"interrupted: every finished text is in {args.out}/generated.jsonl; run the same command to go on")
        print(json.dumps(manifest, indent=2) if args.json else f"wrote {manifest['source']['path']}")
        return
    from evolm.data.prepare import prepare
    from evolm.interop.gguf_vocab import tokenizer_from_gguf
    from evolm.tokenizer import Tokenizer

    tok_path = args.tokenizer
    tok = Tokenizer.from_hf_dir(tok_path) if os.path.isdir(tok_path) else (
        tokenizer_from_gguf(tok_path) if tok_path.endswith(".gguf") else Tokenizer.from_file(tok_path))
    spec = args.spec if len(args.spec) != 1 else args.spec[0]
    manifest = prepare(spec, tok, args.out, data_dir=args.data_dir, workers=args.workers, reuse=not args.force)
    if args.json:
        print(json.dumps(manifest, indent=2))


def cmd_tokenizer(args) -> None:
    from evolm.data.prepare import load_spec
    from evolm.data.sources import iter_documents
    from evolm.tokenizer import train_tokenizer

    sources, _ = load_spec(args.sources if len(args.sources) != 1 else args.sources[0])

    def texts():
        for s in sources:
            for doc in iter_documents(s, args.data_dir):
                yield doc.text

    tok = train_tokenizer(texts(), vocab_size=args.vocab_size, model=args.model, special_tokens=args.special,
                          lowercase=args.lowercase)
    path = tok.save(args.out)
    kind = {"bpe": "byte-level BPE", "wordpiece": "WordPiece", "unigram": "unigram (SentencePiece)"}[args.model]
    print(f"trained {kind} with {tok.vocab_size} tokens -> {path}")


# --- embed -----------------------------------------------------------------------------------
def cmd_embed(args) -> None:
    import dataclasses

    import torch

    from evolm.infer.embed import embed_texts, embedding_options, read_texts, write_embeddings
    from evolm.loading import as_dtype, load, resolve_device

    texts = read_texts(args.input)  # a bad input file is named before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args.model, dtype=as_dtype(args.dtype), device=resolve_device(args.device), need_tokenizer=True)
    options = embedding_options(model, args.model)
    changed = {k: v for k, v in (("pooling", args.pooling), ("max_length", args.max_length),
                                 ("normalize", args.normalize)) if v is not None}
    options = dataclasses.replace(options, **changed)
    vectors = embed_texts(model, tok, texts, options, batch_size=args.batch_size)
    path = write_embeddings(vectors, args.out)
    print(f"{len(texts)} embeddings of {vectors.shape[1]} dims ({options.pooling} pooling"
          f"{', unit length' if options.normalize else ''}, at most {options.max_length} tokens) -> {path}",
          file=sys.stderr)


# --- doctor ----------------------------------------------------------------------------------
def cmd_doctor(args) -> None:
    from evolm.doctor import run_doctor

    code = run_doctor(args)
    if code:
        raise SystemExit(code)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF folder, GGUF file or evolm checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate all --max-new-tokens (benchmarks)")
    p.add_argument("--system", default=None, help="system prompt (chat template)")
    p.add_argument("--threads", type=int, default=None)
    _add_inference_args(p)


# --- the parser ---------------------------------------------------------------------------------
# One function per subcommand fills its parser. Only the command being run is built in full: the
# others' flags come from modules (eval, serve, post-training ...) that are slow to import, and
# `evolm generate` should not wait for them (``evolm --help`` lists every command from COMMANDS).
def _arch_parser(a: argparse.ArgumentParser) -> None:
    asub = a.add_subparsers(dest="arch_cmd", required=True)
    asub.add_parser("list", help="list every preset with its size")
    s = asub.add_parser("show", help="cost card of one architecture")
    s.add_argument("name", help="preset name, config JSON, or HF config.json / folder")
    s.add_argument("--context", type=int, default=None, help="context length for KV/FLOP figures")
    s.add_argument("--json", action="store_true")
    s = asub.add_parser("compare", help="cost cards side by side")
    s.add_argument("names", nargs="+")
    s.add_argument("--context", type=int, default=None)
    s.add_argument("--json", action="store_true")
    s = asub.add_parser("diff", help="config fields that differ between two architectures")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--json", action="store_true")
    s = asub.add_parser("plan", help="per-GPU memory of training/serving under a parallel layout; layouts that fit")
    s.add_argument("name", help="preset name, config JSON, or HF config.json / folder")
    s.add_argument("--gpus", type=int, default=1, help="GPUs in the run (the layout must multiply to it)")
    s.add_argument("--gpu-mem", default=None, help="memory of one GPU, e.g. 80GB or 80GiB (enables fit/suggestions)")
    s.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the config's max_seq_len)")
    s.add_argument("--batch", type=int, default=1, help="sequences per micro batch per data-parallel rank")
    s.add_argument("--layout", default=None, help="e.g. dp_shard=4,tp=2 (keys: dp_replicate, dp_shard, cp, tp, pp, "
                                                  "ep; dp_shard=-1 or absent: the GPUs left)")
    s.add_argument("--dtype", default="bf16", choices=("bf16", "bf16-params", "fp32"),
                   help="bf16: evolm's autocast over fp32 params; bf16-params: FSDP MixedPrecisionPolicy "
                        "(torchtitan); fp32")
    s.add_argument("--optimizer", default="adamw", choices=("adamw", "adam", "sgd", "none"))
    s.add_argument("--activation-checkpointing", action="store_true", help="the peak with per-block checkpointing")
    s.add_argument("--loss", default="fused", choices=("fused", "unfused"),
                   help="evolm's chunked loss, or cross_entropy over the whole logits (torchtitan)")
    s.add_argument("--microbatches", type=int, default=None, help="pipeline micro batches per step (default: pp)")
    s.add_argument("--pp-schedule", default="1f1b", choices=("1f1b", "gpipe"))
    s.add_argument("--gpus-per-node", type=int, default=8, help="for the communication estimate (tp stays in a node)")
    s.add_argument("--no-suggest", action="store_true", help="skip the search of layouts that fit")
    s.add_argument("--json", action="store_true")
    s = asub.add_parser("flatten", help="write one readable PyTorch file with only the parts a config uses")
    s.add_argument("name", help="preset name, config JSON, or HF config.json / folder")
    s.add_argument("--out", required=True, help="the .py file to write")
    a.set_defaults(func=cmd_arch)


def _lab_parser(lab: argparse.ArgumentParser) -> None:
    labsub = lab.add_subparsers(dest="lab_cmd", required=True)
    s = labsub.add_parser("ablate", help="variants of a recipe at equal FLOPs (or tokens) over several seeds")
    s.add_argument("--base", required=True, help="a pretraining recipe (YAML) with train.tokens_per_step; the budget's steps are shared out "
                        "over its stages as it writes them")
    s.add_argument("--vary", action="append", required=True, metavar="KEY=V1,V2",
                   help="a ModelConfig field (norm=layernorm,rmsnorm) or section.key (optim.lr=1e-3,3e-3); "
                        "repeat for more keys (every combination; the first is the baseline)")
    s.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant")
    s.add_argument("--budget", required=True, help="flops=3e14 (equal training FLOPs) or tokens=2e6")
    s.add_argument("--out", required=True, help="lab folder: one run folder per (variant, seed), results.json, report.md")
    _add_lab_run_args(s)
    s = labsub.add_parser("ladder", help="GPT-2, then one innovation per rung, each at equal FLOPs vs the rung before")
    s.add_argument("--base", default="recipes/lab-base.yaml", help="the recipe every rung starts from (default: recipes/lab-base.yaml)")
    s.add_argument("--rungs", default=None, help="comma-separated rung names (default: the whole ladder)")
    s.add_argument("--seeds", type=int, default=3)
    s.add_argument("--budget", default=None, help="flops=... or tokens=... per rung (default: the size's, "
                                                  "flops=4e12 for cpu)")
    s.add_argument("--size", default="cpu", help="the ladder's model shape: cpu (the base recipe as written) or 124m "
                                                 "(GPT-2 small's shape, bf16, compiled: for a GPU)")
    s.add_argument("--out", default="runs/lab/ladder")
    _add_lab_run_args(s)
    from evolm.lab.fit_command import add_fit_args, run_fit

    s = labsub.add_parser("fit", help="fit Chinchilla scaling laws (approaches 2 and 3) to (N, D, loss) points in a CSV")
    add_fit_args(s)
    s.set_defaults(func=run_fit)
    from evolm.lab.grid import add_scaling_args, run_scaling

    s = labsub.add_parser("scaling", help="train an IsoFLOP grid (sizes x FLOPs budgets) and fit the scaling laws to it")
    add_scaling_args(s)
    s.set_defaults(func=run_scaling)


def _convert_parser(c: argparse.ArgumentParser) -> None:
    c.add_argument("--model", required=True, help="HF folder, GGUF file or evolm checkpoint")
    c.add_argument("--to", choices=["hf", "evolm", "gguf"], default="hf")
    c.add_argument("--out", required=True)
    c.add_argument("--type", default=None, metavar="TYPE",
                   help="--to gguf: weight type, f32 f16 (default) bf16 q8_0 q6_k q5_k_m q5_k_s q5_1 q5_0 "
                        "q4_k_m q4_k_s q4_1 q4_0")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    c.set_defaults(func=cmd_convert)


def _quantize_parser(q: argparse.ArgumentParser) -> None:
    q.add_argument("--model", required=True, help="HF folder, GGUF file or evolm checkpoint (float weights)")
    q.add_argument("--out", required=True, help="the quantized evolm folder to write")
    q.add_argument("--method", required=True, choices=["int8", "int4", "nf4", "gptq"])
    q.add_argument("--group-size", type=int, default=32, help="int4/gptq: inputs per scale and min (32: evolm's kernel)")
    q.add_argument("--calib-data", action="append", default=[], metavar="PATH",
                   help="gptq: calibration text (file, JSONL or folder; default the built-in python_docs corpus)")
    q.add_argument("--calib-samples", type=int, default=128, help="gptq: calibration windows")
    q.add_argument("--calib-len", type=int, default=512, help="gptq: tokens per calibration window")
    q.add_argument("--damp", type=float, default=0.01, help="gptq: Hessian dampening, fraction of its mean diagonal")
    q.add_argument("--act-order", action="store_true", help="gptq: columns by decreasing Hessian diagonal")
    q.add_argument("--seed", type=int, default=0, help="gptq: calibration document order")
    q.set_defaults(func=cmd_quantize)


def _prune_parser(pr: argparse.ArgumentParser) -> None:
    pr.add_argument("--model", required=True, help="HF folder, GGUF file or evolm checkpoint (float weights)")
    pr.add_argument("--out", required=True, help="the pruned evolm folder to write")
    pr.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt", "minitron"])
    amount = pr.add_mutually_exclusive_group()
    amount.add_argument("--sparsity", type=float, default=None,
                        help="unstructured: share of each block linear's weights set to zero (default 0.5)")
    amount.add_argument("--pattern", default=None, metavar="N:M",
                        help="semi-structured: N weights kept in every M consecutive inputs of a row (2:4)")
    pr.add_argument("--calib-data", action="append", default=[], metavar="PATH",
                    help="wanda/sparsegpt: calibration text (file, JSONL or folder; default the built-in python_docs)")
    pr.add_argument("--calib-samples", type=int, default=128, help="calibration windows")
    pr.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window")
    pr.add_argument("--seed", type=int, default=0, help="calibration document order")
    pr.add_argument("--damp", type=float, default=0.01, help="sparsegpt: Hessian dampening, fraction of its mean diagonal")
    pr.add_argument("--blocksize", type=int, default=128, help="sparsegpt: columns per lazy batch (and per mask choice)")
    st = pr.add_argument_group("minitron (structured: a smaller config)")
    st.add_argument("--ratio", type=float, default=None, help="minitron: fraction of the parameters removed, in (0, 1)")
    st.add_argument("--cut", default=None, metavar="heads=K,kv=G,mlp=F,embed=D,layers=L",
                    help="minitron: target sizes instead of --ratio (keys left out keep the model's)")
    st.add_argument("--axes", default="mlp,embed", help="minitron --ratio: which of heads,mlp,embed,layers shrink")
    st.add_argument("--layer-metric", choices=["bi", "loss"], default="bi",
                    help="minitron: layer importance, 1 - cos(block in, out) or the loss increase without the block")
    st.add_argument("--no-rescale-norms", dest="rescale_norms", action="store_false",
                    help="minitron: keep RMSNorm weights as they are when hidden channels are cut")
    pr.set_defaults(func=cmd_prune)


def _generate_parser(g: argparse.ArgumentParser) -> None:
    _add_sampling_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    g.add_argument("--image", default=None, help="an image the prompt is about (PNG/JPEG/... file or data: URI; "
                                                  "a vision model: config.vision)")
    g.set_defaults(func=cmd_generate)


def _chat_parser(ch: argparse.ArgumentParser) -> None:
    _add_sampling_args(ch)
    ch.set_defaults(func=cmd_chat)


def _pretrain_parser(pt: argparse.ArgumentParser) -> None:
    pt.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    pt.add_argument("--out", default=None, help="run folder (default: runs/NAME)")
    pt.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    pt.add_argument("--data-dir", default=None, help="where the built-in corpora are installed")
    pt.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    pt.add_argument("--json", action="store_true", help="print the summary as JSON")
    lay = pt.add_argument_group("parallel layout (override the recipe's parallel: section; launch with torchrun; "
                                "-1: the rest of the world; docs/distributed.md)")
    lay.add_argument("--dp-shard", type=int, default=None, help="FSDP2 degree (default -1: the rest)")
    lay.add_argument("--dp-replicate", type=int, default=None, help="replicas (DDP, or HSDP with --dp-shard > 1)")
    lay.add_argument("--tp", type=int, default=None, help="tensor-parallel degree")
    lay.add_argument("--pp", type=int, default=None, help="pipeline stages")
    lay.add_argument("--cp", type=int, default=None, help="context-parallel degree (ring attention)")
    lay.add_argument("--ep", type=int, default=None, help="expert-parallel degree (borrows data-parallel ranks)")
    pt.set_defaults(func=cmd_pretrain)


def cmd_vlm(args) -> None:
    from evolm.train.vlm import load_vlm_recipe, run_vlm

    recipe = load_vlm_recipe(args.config)
    if args.init:  # the same stage from another model (e.g. the LLaVA-style variant's previous stage)
        if recipe.model.init is None:
            _fail(f"--init: {args.config} builds its model from a preset; it takes no init")
        recipe.model.init = args.init
    summary = run_vlm(recipe, out_dir=args.out, resume=args.resume, stop_after_steps=args.stop_after)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("losses", "rows")}, indent=2, default=str))


def _vlm_parser(v: argparse.ArgumentParser) -> None:
    v.add_argument("--config", required=True, help="VLM stage recipe YAML (recipes/vlm-digits-*.yaml)")
    v.add_argument("--out", default=None, help="run folder (default: runs/NAME)")
    v.add_argument("--init", default=None, help="start from this run folder instead of the recipe's model.init")
    v.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    v.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    v.set_defaults(func=cmd_vlm)


def _data_parser(d: argparse.ArgumentParser) -> None:
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    di = dsub.add_parser("install", help="install the built-in corpora")
    di.add_argument("names", nargs="*")
    di.add_argument("--data-dir", default=None)
    di.add_argument("--force", action="store_true")
    di.add_argument("--post", action="store_true",
                    help="install the post-training sets instead (LLaMA-Factory's alpaca_en_demo + dpo_en_demo, "
                         "OpenAI evals chat samples, BBC news classification) into data/post")
    dp = dsub.add_parser("prepare", help="filter, dedup, split and tokenize sources into shards")
    dp.add_argument("spec", nargs="+", help="built-in corpus names, paths, or a JSON/YAML spec file")
    dp.add_argument("--tokenizer", required=True, help="tokenizer.json, HF folder or GGUF file")
    dp.add_argument("--out", required=True)
    dp.add_argument("--data-dir", default=None)
    dp.add_argument("--workers", type=int, default=None)
    dp.add_argument("--force", action="store_true", help="redo even if up to date")
    dp.add_argument("--json", action="store_true")
    from evolm.data.synthesize import add_arguments as add_synthesize_arguments

    ds = dsub.add_parser("synthesize", help="generate a corpus with a model (prompts or topics x a template), "
                                            "deduplicated and filtered, as a source for data prepare")
    add_synthesize_arguments(ds)
    ds.add_argument("--json", action="store_true", help="print the manifest")
    _add_inference_args(ds, decode_loop=False)
    d.set_defaults(func=cmd_data)


def _serve_parser(sv: argparse.ArgumentParser) -> None:
    from evolm.serve import add_arguments as add_serve_arguments

    add_serve_arguments(sv)
    _add_inference_args(sv, decode_loop=False)
    sv.set_defaults(func=cmd_serve)


def _eval_parser(ev: argparse.ArgumentParser) -> None:
    from evolm.eval.harness import add_eval_args, main_cli

    add_eval_args(ev)
    ev.set_defaults(func=main_cli)


def _post_parser(name: str, module: str, config_name: str):
    """The parser filler of post-training command ``name``: a typed config (flags derived from its
    fields) and ``run_<name>`` from ``evolm.post.<module>``."""

    def fill(sp: argparse.ArgumentParser) -> None:
        import importlib

        from evolm.post.flags import add_options, from_args

        mod = importlib.import_module(f"evolm.post.{module}")
        config_class, run = getattr(mod, config_name), getattr(mod, f"run_{name}")
        add_options(sp, config_class)
        sp.set_defaults(func=lambda args: run(from_args(config_class, args)))

    return fill


def _tokenizer_parser(t: argparse.ArgumentParser) -> None:
    tsub = t.add_subparsers(dest="tok_cmd", required=True)
    from evolm.tokenizer import TOKENIZER_MODELS

    tt = tsub.add_parser("train", help="train a tokenizer (byte-level BPE, WordPiece, unigram) on a corpus")
    tt.add_argument("sources", nargs="+", help="built-in corpus names, paths, or a spec file")
    tt.add_argument("--model", choices=tuple(TOKENIZER_MODELS), default="bpe",
                    help="bpe: GPT-2's byte-level BPE; wordpiece: BERT's; unigram: T5's SentencePiece unigram")
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--special", action="append",
                    help="special token (repeatable; default: the family's, in role order: "
                         + "; ".join(f"{m}: {' '.join(t)}" for m, t in TOKENIZER_MODELS.items()) + ")")
    tt.add_argument("--lowercase", action="store_true", help="an uncased WordPiece (as bert-base-uncased)")
    tt.add_argument("--out", required=True, help="folder for tokenizer.json")
    tt.add_argument("--data-dir", default=None)
    t.set_defaults(func=cmd_tokenizer)


def _embed_parser(e: argparse.ArgumentParser) -> None:
    from evolm.infer.embed import POOLINGS

    e.add_argument("--model", required=True, help="an encoder: HF folder (e.g. all-MiniLM-L6-v2) or evolm checkpoint")
    e.add_argument("--input", required=True, help="UTF-8 text file, one text per line")
    e.add_argument("--out", required=True, help="embeddings: .npy (float32 N x d) or JSON Lines (one array per "
                                                "input line)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-length", type=int, default=None,
                   help="tokens per text (default: sentence_bert_config.json's max_seq_length, else the model's)")
    e.add_argument("--pooling", choices=POOLINGS, default=None,
                   help="over the real tokens (default: the folder's 1_Pooling/config.json, else mean)")
    e.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="unit length (default: on unless modules.json lists no Normalize)")
    e.add_argument("--dtype", choices=DTYPES, default="float32")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    e.add_argument("--threads", type=int, default=None)
    e.set_defaults(func=cmd_embed)


def _checkpoint_parser(c: argparse.ArgumentParser) -> None:
    csub = c.add_subparsers(dest="ckpt_cmd", required=True)
    s = csub.add_parser("consolidate", help="write model.safetensors from a sharded (train.ckpt_format: dcp) "
                                            "step folder, on one process")
    s.add_argument("step", help="a step folder, e.g. runs/NAME/checkpoints/step_0000200")
    s.add_argument("--out", default=None, help="folder to write (default: the step folder itself)")
    c.set_defaults(func=cmd_checkpoint)


def _doctor_parser(dr: argparse.ArgumentParser) -> None:
    from evolm.doctor import add_doctor_args

    add_doctor_args(dr)
    dr.set_defaults(func=cmd_doctor)


# (name, help, the function that fills its parser), in the order `evolm --help` lists them
COMMANDS = (
    ("arch", "architecture presets, cost cards and comparisons", _arch_parser),
    ("lab", "measure what an innovation buys: ablations at equal compute, seeds, scaling fits", _lab_parser),
    ("convert", "convert a model between formats", _convert_parser),
    ("quantize", "weight-only post-training quantization: int8, int4, nf4, gptq (calibrated)", _quantize_parser),
    ("prune", "prune weights: magnitude, wanda, sparsegpt (unstructured or n:m); minitron (structured, a smaller "
              "model)", _prune_parser),
    ("generate", "stream a continuation of a prompt", _generate_parser),
    ("chat", "interactive multi-turn chat in the terminal", _chat_parser),
    ("pretrain", "pretrain a model from a recipe (stages, mixtures, checkpoints)", _pretrain_parser),
    ("checkpoint", "sharded training checkpoints: consolidate into model.safetensors", _checkpoint_parser),
    ("vlm", "train a vision-language model one stage at a time: projector alignment, then full tuning",
     _vlm_parser),
    ("data", "install corpora, prepare token shards", _data_parser),
    ("serve", "OpenAI-compatible HTTP server (continuous batching) + web chat page", _serve_parser),
    ("eval", "evaluate on benchmarks, scored as lm-evaluation-harness scores them", _eval_parser),
    ("merge", "fold a LoRA adapter (PEFT folder) into its base model", _post_parser("merge", "lora", "MergeConfig")),
    ("sft", "supervised fine-tuning on chat data (full, LoRA or QLoRA; T5/BART: prompt -> answer)", _post_parser("sft", "sft", "SFTConfig")),
    ("dpo", "preference optimisation (DPO / cDPO / IPO / SimPO) on preference pairs",
     _post_parser("dpo", "dpo", "DPOConfig")),
    ("grpo", "GRPO: reinforcement learning from verifiable rewards on sampled groups",
     _post_parser("grpo", "grpo", "GRPOConfig")),
    ("distill", "distil a teacher's next-token distributions into a student (forward / reverse KL, generalized "
                "JSD, on-policy GKD)", _post_parser("distill", "distill", "DistillConfig")),
    ("embed", "sentence embeddings from an encoder (mean-pooled, unit length), one per input line", _embed_parser),
    ("finetune", "fine-tune an encoder for a task: --task classify (text, label rows), accuracy before/after",
     _post_parser("finetune", "classify", "FinetuneConfig")),
    ("tokenizer", "train a tokenizer", _tokenizer_parser),
    ("doctor", "check this machine and the pinned assets; print the command that fixes each gap", _doctor_parser),
)


def build_parser(only: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The ``evolm`` parser. ``only``: build just these subcommands' flags (the others are listed with
    their help, enough for ``evolm --help`` and for naming a mistyped command); None builds every one."""
    p = argparse.ArgumentParser(prog="evolm", description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--allow-large", action="store_true",
                   help="load models larger than this machine's memory (sizes in model files are otherwise "
                        "checked against it; also EVOLM_ALLOW_LARGE=1)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_text, fill in COMMANDS:
        sp = sub.add_parser(name, help=help_text)
        if only is None or name in only:
            fill(sp)
    return p


def _command(argv: list[str]) -> tuple[str, ...]:
    """The subcommand ``argv`` names (its first word that is not an option), if it is one."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return (word,) if word in {name for name, _, _ in COMMANDS} else ()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command(argv)).parse_args(argv)
    from evolm.config import ConfigError

    if args.allow_large or os.environ.get("EVOLM_ALLOW_LARGE", "") not in ("", "0"):  # read here, nowhere deeper
        from evolm.interop.empty import allow_large_models

        allow_large_models()
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, KeyboardInterrupt) as e:
        if isinstance(e, KeyboardInterrupt):
            _fail("interrupted (the last checkpoint is intact; continue with --resume)")
        _fail(str(e))
    except BrokenPipeError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
