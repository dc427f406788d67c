"""`evolm quantize`: every method writes an evolm folder that loads back with exactly its numbers and
runs through the ordinary inference path; calibration errors name their numbers."""

from pathlib import Path

import pytest
import torch

from evolm import build
from evolm.cli import main
from evolm.infer import SamplingParams, generate
from evolm.infer.prepare import InferenceOptions, load_for_inference
from evolm.loading import load, save
from evolm.presets import get_preset
from evolm.quant import Int4Linear, Int8Linear, KernelPolicy
from evolm.quant.calibration import CalibrationConfig, CalibrationError, calibration_ids, held_out
from evolm.quant.nf4 import NF4Linear
from evolm.quant.quantize import QuantizeConfig, bits_per_weight, quantize_model

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 300


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with a trained BPE tokenizer saved as an evolm folder, and a text to calibrate on."""
    from evolm.tokenizer import train_bpe

    tmp = tmp_path_factory.mktemp("quant")
    texts = [(ROOT / f).read_text() for f in ("README.md", "src/evolm/model.py", "src/evolm/quant/gptq.py")]
    tok = train_bpe(texts, vocab_size=VOCAB, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    model = build(get_preset("tiny-llama").replace(vocab_size=VOCAB, tie_embeddings=True)).eval()
    save(model, tmp / "model", tokenizer=tok)
    calib = tmp / "calib.txt"
    calib.write_text("\n".join(texts))
    return tmp, model, tok, calib


@pytest.mark.parametrize("method", ["int8", "int4", "nf4", "gptq"])
def test_each_method_round_trips_exactly_and_generates(tiny, method, tmp_path):
    root, _, _, calib = tiny
    out = tmp_path / method
    main(["quantize", "--model", str(root / "model"), "--out", str(out), "--method", method,
          "--calib-data", str(calib), "--calib-samples", "8", "--calib-len", "64"])
    model, tok = load(out)
    kinds = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear, "gptq": Int4Linear}
    assert isinstance(model.layers[0].mlp.down_proj, kinds[method])
    assert isinstance(model.lm_head, Int8Linear)  # the tied head, quantized apart
    assert model.quantization["method"] == method

    # saving the loaded model again writes the same tensors: nothing is requantized on the way
    save(model, tmp_path / "again", tokenizer=tok)
    from safetensors.torch import load_file

    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "layers.0.mlp.down_proj.qweight" in a and "layers.0.mlp.down_proj.weight" not in a

    # the ordinary inference path (generate / chat / serve / eval) runs it
    ready, tok = load_for_inference(out, InferenceOptions(device="cpu"))
    ids = torch.tensor([tok.encode("def forward(self")])
    got = generate(ready, ids, SamplingParams(max_new_tokens=6, temperature=0))
    assert len(got[0]) == 6
    # ... with the very numbers of the model quantized in memory
    base = tiny[1]
    mem = build(base.config).eval()
    mem.load_state_dict(base.state_dict())
    quantize_model(mem, QuantizeConfig(method, calibration=CalibrationConfig((str(calib),), 8, 64)), tok)
    with torch.no_grad():
        torch.testing.assert_close(ready(ids), mem(ids), rtol=0, atol=0)
    # the loss fused with a quantized head equals the loss of its logits
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(ready(x).flatten(0, 1), y.flatten())
        torch.testing.assert_close(ready(x, targets=y), want, rtol=1e-5, atol=1e-5)


def test_quantized_logits_are_close_and_gptq_beats_round_to_nearest(tiny):
    """On calibration-like text a GPTQ model's logits are nearer the float model's than int4 RTN's."""
    _, base, tok, calib = tiny
    x = calibration_ids(tok, CalibrationConfig((str(calib),), 4, 64, seed=1))
    with torch.no_grad():
        ref = base(x)

    def err(method):
        model = build(base.config).eval()
        model.load_state_dict(base.state_dict())
        quantize_model(model, QuantizeConfig(method, calibration=CalibrationConfig((str(calib),), 16, 64)), tok)
        with torch.no_grad():
            return float((model(x) - ref).norm() / ref.norm()), bits_per_weight(model)

    (e8, b8), (e4, b4), (eg, bg) = err("int8"), err("int4"), err("gptq")
    assert e8 < 0.02 and e4 < 0.2, (e8, e4)
    assert eg < e4, (eg, e4)
    assert b4 == bg and 5 < b4 < 6 and 8 < b8 < 8.5  # 4 bits + float16 (scale, min) per 32, and the int8 head


@pytest.mark.parametrize("quant_kernels", [True, False])
def test_int4_codes_rebuild_the_same_layer_in_either_layout(quant_kernels):
    """Codes read back from a layer (evolm's q4 layout, or torch's opaque int4pack) rebuild it exactly."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    layer = Int4Linear(lin.weight, lin.bias, 32, KernelPolicy(quant_kernels=quant_kernels))
    q, scale, lo = layer.codes()
    assert q.shape == (32, 64) and int(q.max()) <= 15
    again = Int4Linear.from_codes(q, scale, lo, lin.bias, KernelPolicy(quant_kernels=quant_kernels))
    assert again.layout == layer.layout
    torch.testing.assert_close(again.dequantize(), layer.dequantize(), rtol=0, atol=0)


def test_kernel_buffers_keep_their_dtype_through_model_to():
    model = build(get_preset("tiny-llama")).eval()
    quantize_model(model, QuantizeConfig("int4"))
    q = model.layers[0].self_attn.q_proj
    dtypes = {n: b.dtype for n, b in q.named_buffers()}
    model.to(torch.bfloat16)
    assert {n: b.dtype for n, b in q.named_buffers()} == dtypes


def test_calibration_set_too_small_names_the_numbers(tiny, tmp_path, capsys):
    _, _, tok, _ = tiny
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    with pytest.raises(CalibrationError, match=r"128 samples x 512 tokens = 65536 tokens needed, .*short.txt hold \d+"):
        calibration_ids(tok, CalibrationConfig((str(short),)))
    root = tiny[0]
    with pytest.raises(SystemExit):  # the CLI says it in one line
        main(["quantize", "--model", str(root / "model"), "--out", str(tmp_path / "q"), "--method", "gptq",
              "--calib-data", str(short), "--calib-samples", "2", "--calib-len", "64"])
    err = capsys.readouterr().err
    assert "calibration set too small: 2 samples x 64 tokens = 128 tokens needed" in err and "Traceback" not in err


def test_held_out_documents_are_never_calibrated_on(tmp_path):
    from evolm.tokenizer import train_bpe

    docs = [f"document number {i} " * 20 for i in range(30)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join('{"text": "%s"}' % d for d in docs))
    tok = train_bpe(docs, vocab_size=300, special_tokens=["<|endoftext|>"])
    ids = calibration_ids(tok, CalibrationConfig((str(path),), 4, 32))
    text = tok.decode(ids.flatten().tolist())
    assert held_out(docs) == [docs[9], docs[19], docs[29]]
    assert not any(f"number {i} " in text for i in (9, 19, 29))


def test_a_bad_method_or_an_already_quantized_model_is_refused(tiny):
    with pytest.raises(ValueError, match="--method 'int3'"):
        QuantizeConfig("int3")
    model = build(get_preset("tiny-llama")).eval()
    quantize_model(model, QuantizeConfig("int8"))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, QuantizeConfig("int4"))


def test_a_quantized_model_is_not_written_as_a_float_hf_folder(tmp_path):
    model = build(get_preset("tiny-llama")).eval()
    quantize_model(model, QuantizeConfig("int4"))
    with pytest.raises(ValueError, match="weight-only quantized \\(int4\\)"):
        save(model, tmp_path / "hf", fmt="hf")
