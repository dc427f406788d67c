"""The OpenAI-compatible server, tested as its users meet it.

A real server process (``evolm.serve.run_server``) serves the real SmolLM2-135M-Instruct GGUF on
a free localhost port; the official ``openai`` client talks to it (streaming and not, chat and
completions), and raw ``httpx`` requests send what a client should not. The reference for what
the server generates is ``evolm.infer.generate`` (whose decoding the parity tests hold equal to
transformers) run in this process, and the server itself alone: a greedy request must give the
same tokens whether it runs alone or in a batch with others.

The scheduler's failure isolation and its sliding-window / MLA / learned-position paths are
tested in-process on the engine (``evolm.serve.scheduler``) with tiny models.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

fastapi = pytest.importorskip("fastapi", reason="serving needs fastapi: pip install 'evolm[serve]'")
pytest.importorskip("uvicorn", reason="serving needs uvicorn: pip install 'evolm[serve]'")
openai = pytest.importorskip("openai", reason="the server tests use the official openai client: pip install openai")
httpx = pytest.importorskip("httpx", reason="pip install httpx")

from evolm.infer import SamplingParams, generate  # noqa: E402
from evolm.infer.text import chat_prompt_ids  # noqa: E402
from evolm.serve.scheduler import DoneEvent, Engine, ErrorEvent, GenRequest, TokenEvent  # noqa: E402

API_KEY = "test-key-123"
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Explain gravity in one sentence.", "Who wrote Hamlet?", "Give me a recipe for pancakes."]


def smollm2_path() -> Path:
    from evolm.interop.gguf import find_asset

    try:
        return find_asset("smollm2")
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"the SmolLM2-135M-Instruct GGUF is not installed ({e}); run `make models`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``run_server`` in a child process on a free port; stopped (by its pid) on exit."""

    def __init__(self, model: Path, log_path: Path, **kwargs):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # one torch thread: the suite runs beside other test workers on small hosts, where a server's
        # OpenMP workers spinning against them made decoding crawl (requests timed out); speed is
        # benchmarks/serve_load.py's business, not the tests'
        args = {"port": self.port, "log_level": "warning", "threads": 1, **kwargs}
        code = f"from evolm.serve import run_server; run_server({str(model)!r}, **{args!r})"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(smollm2_path(), tmp_path_factory.mktemp("serve") / "server.log", api_key=API_KEY,
                        max_batch=8)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def local():
    """The same GGUF loaded in this process: the reference the server's output is checked against."""
    from evolm import load

    return load(smollm2_path(), dtype=torch.float32)


# ------------------------------------------------------------------------------------------
# the openai client against the real server
# ------------------------------------------------------------------------------------------
def test_models_health_and_page(server, client, model_id):
    assert model_id == "SmolLM2-135M-Instruct.Q4_1"
    assert client.models.retrieve(model_id).id == model_id
    h = server.health()
    assert h["status"] == "ok" and h["model"] == model_id and h["max_batch"] == 8
    page = httpx.get(server.url + "/", timeout=10)  # the chat page needs no key
    assert page.status_code == 200 and "evolm chat" in page.text and "/v1/chat/completions" in page.text


def test_chat_matches_local_generate(client, model_id, local):
    """Greedy chat through HTTP = evolm.infer.generate on the same chat-templated prompt, token for token."""
    model, tok = local
    for prompt in PROMPTS[:2]:
        ids = chat_prompt_ids(tok, [{"role": "user", "content": prompt}])
        ref = generate(model, ids, SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=tok.eos_ids))[0]
        finished = ref[-1] in tok.eos_ids
        r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=16, temperature=0)
        ch = r.choices[0]
        assert ch.message.role == "assistant"
        assert ch.message.content == tok.decode(ref[:-1] if finished else ref)
        assert ch.finish_reason == ("stop" if finished else "length")
        assert r.usage.prompt_tokens == len(ids)
        assert r.usage.completion_tokens == len(ref)
        assert r.usage.total_tokens == len(ids) + len(ref)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_chat_stream_equals_non_stream(client, model_id):
    msgs = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name a color."}]
    full = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_completions_stream_and_non_stream(client, model_id, local):
    _, tok = local
    prompt = "The capital of France is"
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == 10
    assert "Paris" in r.choices[0].text
    parts = list(client.completions.create(model=model_id, prompt=prompt, max_tokens=10, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"
    assert parts[-1].usage.completion_tokens == 10  # usage in every response, streams included
    # token-id prompts, several prompts, echo
    ids = tok.encode(prompt)
    ids2 = tok.encode("1, 2, 3,")
    r2 = client.completions.create(model=model_id, prompt=[ids, ids2], max_tokens=10, temperature=0, echo=True)
    assert [c.index for c in r2.choices] == [0, 1]
    assert r2.choices[0].text == tok.decode(ids) + r.choices[0].text
    assert r2.usage.prompt_tokens == len(ids) + len(ids2)
    r3 = client.completions.create(model=model_id, prompt=[prompt, "1, 2, 3,"], max_tokens=10, temperature=0)
    assert r3.choices[0].text == r.choices[0].text and r3.choices[1].text == r2.choices[1].text[len(tok.decode(ids2)):]


def test_stop_strings_n_seed_and_logit_bias(client, model_id, local):
    r = client.completions.create(model=model_id, prompt="Count: 1, 2, 3, 4,", max_tokens=20, temperature=0,
                                  stop=[" 7"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == " 5, 6,"
    kw = dict(model=model_id, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
              temperature=1.0, top_p=0.9, seed=1234, n=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert len({c.message.content for c in a.choices}) > 1  # each choice its own draw (seed + index)
    assert a.usage.completion_tokens <= 3 * 12 and a.usage.prompt_tokens == b.usage.prompt_tokens
    # logit_bias -100 bans the greedy choice; the next best token takes its place
    _, tok = local
    base = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=1,
                                     temperature=0, logprobs=2)
    first, second = sorted(base.choices[0].logprobs.top_logprobs[0].items(), key=lambda kv: -kv[1])
    tid = tok.encode(first[0], add_special_tokens=False)
    assert len(tid) == 1
    biased = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=1,
                                       temperature=0, logit_bias={str(tid[0]): -100})
    assert biased.choices[0].text == second[0]


def test_logprobs(client, model_id):
    r = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=5,
                                  temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) <= 3
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token
    c = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert 1 <= len(content) <= 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)


def test_concurrent_greedy_equals_alone(server, client, model_id):
    """Continuous batching must not change a request's greedy output."""
    kw = dict(model=model_id, max_tokens=20, temperature=0)
    alone = [client.chat.completions.create(messages=[{"role": "user", "content": p}], **kw).choices[0].message.content
             for p in PROMPTS]
    peak_before = server.health()["steps"]
    results: dict[int, str] = {}

    def one(i: int) -> None:
        time.sleep(0.05 * i)  # staggered: requests join a batch that is already decoding
        r = client.chat.completions.create(messages=[{"role": "user", "content": PROMPTS[i]}], **kw)
        results[i] = r.choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    h = server.health()
    assert h["peak_active"] >= 4, h  # they did share decode steps
    assert h["steps"] > peak_before
    assert [results[i] for i in range(len(PROMPTS))] == alone


def test_disconnect_frees_slot(server, client, model_id):
    before = server.health()
    body = {"model": model_id, "messages": [{"role": "user", "content": "Write a very long essay."}],
            "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status_code == 200
            n = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    n += 1
                if n >= 4:
                    break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        h = server.health()
        if h["active"] == 0 and h["waiting"] == 0:
            break
        time.sleep(0.2)
    assert h["active"] == 0 and h["cancelled"] > before["cancelled"], h
    assert h["tokens"] - before["tokens"] < 1000  # it stopped long before max_tokens
    # and the server carries on
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert r.choices[0].message.content


# ------------------------------------------------------------------------------------------
# what a client should not send
# ------------------------------------------------------------------------------------------
def _post(server, path: str, content, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = content if isinstance(content, (str, bytes)) else json.dumps(content)
    return httpx.post(f"{server.url}{path}", content=data, headers=headers, timeout=60)


def _error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_malformed_requests(server, model_id):
    C, CH = "/v1/completions", "/v1/chat/completions"
    ok = {"model": model_id, "prompt": "Hello", "max_tokens": 2}
    msgs = [{"role": "user", "content": "Hi"}]
    assert _post(server, C, ok).status_code == 200
    _error(_post(server, C, "{not json"), 400, code="invalid_json")
    _error(_post(server, C, b"\xff\xfe"), 400, code="invalid_json")
    _error(_post(server, C, [1, 2]), 400, code="invalid_json")
    _error(_post(server, C, {"prompt": "x"}), 400, param="model")
    _error(_post(server, C, {**ok, "max_tokens": "5"}), 400, param="max_tokens")
    _error(_post(server, C, {**ok, "max_tokens": 2.5}), 400, param="max_tokens")
    _error(_post(server, C, {**ok, "max_tokens": 0}), 400, param="max_tokens")
    _error(_post(server, C, {**ok, "temperature": "hot"}), 400, param="temperature")
    _error(_post(server, C, {**ok, "temperature": 3}), 400, param="temperature")
    _error(_post(server, C, {**ok, "top_p": 1.5}), 400, param="top_p")
    _error(_post(server, C, {**ok, "n": 0}), 400, param="n")
    _error(_post(server, C, {**ok, "stream": "yes"}), 400, param="stream")
    _error(_post(server, C, {**ok, "stop": 7}), 400, param="stop")
    _error(_post(server, C, {**ok, "prompt": [1, "a"]}), 400, param="prompt")
    _error(_post(server, C, {**ok, "prompt": [10 ** 9]}), 400, param="prompt")
    _error(_post(server, C, {**ok, "prompt": ""}), 400, param="prompt")
    _error(_post(server, C, {**ok, "logit_bias": {"abc": 1}}), 400, param="logit_bias")
    _error(_post(server, C, {**ok, "model": "gpt-4"}), 404, param="model", code="model_not_found")
    _error(_post(server, CH, {"model": "gpt-4", "messages": msgs}), 404, code="model_not_found")
    _error(_post(server, CH, {"model": model_id, "messages": []}), 400, param="messages")
    _error(_post(server, CH, {"model": model_id, "messages": "Hi"}), 400, param="messages")
    _error(_post(server, CH, {"model": model_id, "messages": [{"role": "robot", "content": "x"}]}), 400,
           param="messages.0.role")
    _error(_post(server, CH, {"model": model_id, "messages": [{"role": "user", "content": 5}]}), 400,
           param="messages.0.content")
    _error(_post(server, CH, {"model": model_id, "messages": msgs, "tools": [{"type": "function"}]}), 400,
           param="tools")
    # beyond the context length (8192 for SmolLM2)
    _error(_post(server, C, {**ok, "max_tokens": 9000}), 400, param="max_tokens", code="context_length_exceeded")
    long_prompt = list(range(100, 100 + 8000))
    _error(_post(server, C, {**ok, "prompt": long_prompt, "max_tokens": 500}), 400, param="prompt",
           code="context_length_exceeded")
    _error(_post(server, CH, {"model": model_id, "messages": [{"role": "user", "content": "word " * 8200}]}),
           400, param="messages", code="context_length_exceeded")
    # API key
    _error(_post(server, C, ok, key=None), 401, code="invalid_api_key")
    _error(_post(server, C, ok, key="wrong"), 401, code="invalid_api_key")
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    # unknown endpoint / method
    _error(httpx.get(f"{server.url}/v1/nothing", timeout=10), 404)
    _error(httpx.delete(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10), 405)
    # nothing of this hurt the server
    assert server.health()["status"] == "ok"
    assert _post(server, C, ok).status_code == 200


def test_openai_client_raises_typed_errors(client, model_id):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt="x", max_tokens=10 ** 6)
    assert e.value.code == "context_length_exceeded"
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ------------------------------------------------------------------------------------------
# the engine in-process: failure isolation, other attention kinds
# ------------------------------------------------------------------------------------------
class Collector:
    """Gathers engine events per request; ``wait`` until every request has ended."""

    def __init__(self):
        self.tokens: dict[int, list[int]] = {}
        self.end: dict[int, object] = {}
        self.cv = threading.Condition()

    def __call__(self, ev) -> None:
        with self.cv:
            if isinstance(ev, TokenEvent):
                self.tokens.setdefault(ev.index, []).append(ev.token_id)
            else:
                self.end[ev.index] = ev
                self.cv.notify_all()

    def wait(self, n: int, timeout: float = 120) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.end) >= n, timeout), (self.end, n)


def _run(engine: Engine, prompts: list[list[int]], max_new: int, stagger: float = 0.0, **kw) -> Collector:
    col = Collector()
    for i, p in enumerate(prompts):
        engine.submit(GenRequest(p, SamplingParams(max_new_tokens=max_new, temperature=0), col, index=i, **kw))
        time.sleep(stagger)
    col.wait(len(prompts))
    return col


def test_one_failing_request_does_not_hurt_the_others(local, monkeypatch):
    model, tok = local
    engine = Engine(model, tok, max_batch=4).start()
    try:
        prompts = [chat_prompt_ids(tok, [{"role": "user", "content": p}]) for p in PROMPTS[:3]]
        ref = _run(engine, prompts, 8)
        original = Engine._choose
        calls = {"n": 0}

        def flaky(self, s, logits):  # request 1 fails on its third token
            if s.req.index == 1 and s.n_out == 2:
                raise RuntimeError("injected failure")
            return original(self, s, logits)

        monkeypatch.setattr(Engine, "_choose", flaky)
        got = _run(engine, prompts, 8, logit_bias={0: 0.0})  # a (no-op) bias routes tokens through _choose
        assert isinstance(got.end[1], ErrorEvent) and "injected failure" in got.end[1].message
        for i in (0, 2):
            assert isinstance(got.end[i], DoneEvent) and got.tokens[i] == ref.tokens[i]
        # a failing batched forward pass fails that step's requests only; the engine goes on
        real_forward = model.forward

        def broken_forward(*a, **k):
            if k.get("attention_mask") is not None and calls["n"] == 0:
                calls["n"] += 1
                raise RuntimeError("injected forward failure")
            return real_forward(*a, **k)

        monkeypatch.undo()
        monkeypatch.setattr(model, "forward", broken_forward)
        got = _run(engine, prompts[:2], 4)
        assert any(isinstance(e, ErrorEvent) and "injected" in e.message for e in got.end.values())
        monkeypatch.undo()
        again = _run(engine, prompts, 8)
        assert again.tokens == ref.tokens and engine.alive
        deadline = time.monotonic() + 10  # rows are freed right after their last token is sent
        while engine.snapshot()["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.snapshot()["active"] == 0
    finally:
        engine.stop()


class _IdTokenizer:
    """Enough of a tokenizer for the engine: ids spelled as numbers, no end-of-sequence token."""

    eos_ids: list[int] = []

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)

    def encode(self, text):
        return []


# Llama 4's parts on tiny-llama: chunks of 8, NoPE + query temperature on layer 3, L2 QK-norm,
# input-scaled sigmoid experts every 2nd layer
LLAMA4_PARTS = dict(n_layers=4, rope_interleave=True, nope_layers=(3,), attention_chunk_size=8, sliding_window_pattern=4,
                    attn_temperature_tuning=True, attn_floor_scale=8.0, qk_norm="l2", n_experts=4, n_experts_per_tok=1,
                    moe_d_ff=64, moe_layer_step=2, n_shared_experts=1, router="sigmoid", norm_topk_prob=False,
                    router_scales_input=True)


@pytest.mark.parametrize("preset", ["tiny-gemma3", "tiny-deepseek", "tiny-gpt2", "tiny-llama", "llama4"])
def test_engine_matches_generate_for_every_attention_kind(preset, one_thread):
    """Sliding windows (Gemma 3, window 16), MLA (DeepSeek-V3), learned positions (GPT-2), GQA
    (Llama), Llama 4's chunks and query temperature: requests of different lengths share decode
    steps, run past the window, and a late one joins a running batch; each equals generate() on
    its own (ring-buffer KVCache there)."""
    from evolm.model import build
    from evolm.presets import get_preset

    torch.manual_seed(0)
    model = build(get_preset("tiny-llama").replace(**LLAMA4_PARTS) if preset == "llama4" else preset).eval()
    with torch.no_grad():  # sharpen the random model's logits so argmax is far from ties
        model.embed_tokens.weight.mul_(8)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 11, 20, 7)]
    max_new = [30, 9, 21, 26]
    ref = [generate(model, p, SamplingParams(max_new_tokens=m, temperature=0))[0] for p, m in zip(prompts, max_new)]
    engine = Engine(model, _IdTokenizer(), max_batch=3, max_len=128)
    col = Collector()
    for i, (p, m) in enumerate(zip(prompts, max_new)):  # queued before the loop starts: 3 run, 1 waits
        engine.waiting.append(GenRequest(p, SamplingParams(max_new_tokens=m, temperature=0), col, index=i))
    engine.start()
    try:
        col.wait(len(prompts))
    finally:
        engine.stop()
    assert engine.stats["peak_active"] == 3
    assert [col.tokens[i] for i in range(len(prompts))] == ref
    assert all(isinstance(e, DoneEvent) and e.finish_reason == "length" for e in col.end.values())


def test_build_app_keeps_blocks():
    """`evolm serve` with no flags: the engine's model keeps the GGUF file's blocks, on the CPU
    even with --device auto, with q/k/v and gate/up fused (4 block matmuls a layer, not 7)."""
    from evolm.infer.prepare import InferenceOptions
    from evolm.quant.blocks import BlockLinear
    from evolm.serve import build_app

    _, engine = build_app(smollm2_path(), InferenceOptions(device="auto", dtype="float32"))
    assert engine.device.type == "cpu"
    assert sum(isinstance(m, BlockLinear) for m in engine.model.modules()) == 30 * 4 + 1


def test_build_app_loads_off_the_main_thread(monkeypatch):
    """The model is loaded (and the engine built) in a thread that has ended when build_app
    returns: the main thread then holds no OpenMP workers to slow the engine thread's (see
    evolm.serve.in_own_thread); a loading error still reaches the caller, with its type."""
    import threading

    import evolm.infer.prepare as prepare
    from evolm.serve import build_app, in_own_thread

    seen = []
    real = prepare.load_for_inference

    def spy(*a, **k):
        seen.append(threading.current_thread())
        return real(*a, **k)

    monkeypatch.setattr(prepare, "load_for_inference", spy)
    build_app(smollm2_path())
    assert len(seen) == 1 and seen[0] is not threading.main_thread() and not seen[0].is_alive()

    def fails():
        raise FileNotFoundError("no such model: x.gguf")

    with pytest.raises(FileNotFoundError, match="x.gguf"):
        in_own_thread(fails)


def test_engine_on_the_default_path_decodes_as_generate():
    """`evolm serve`'s default preparation of the GGUF (blocks kept, fused, the CPU block step):
    no padding rows (each row is computed as alone), a lone request and 10 concurrent ones (more
    than the row kernels take at once: decoded in chunks) give generate()'s tokens on the same
    model, through the fused step; prompts past 128 tokens, where attention splits its keys."""
    from evolm.infer.prepare import load_for_inference
    from evolm.quant.blocks import KERNEL_ROWS
    from evolm.serve import _default_inference

    model, tok = load_for_inference(smollm2_path(), _default_inference())
    engine = Engine(model, tok, max_batch=KERNEL_ROWS + 2)
    assert engine.exact_rows == KERNEL_ROWS and engine.min_decode_rows == 1 and engine.step_rows == KERNEL_ROWS
    long = " ".join(PROMPTS) * 3
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": p}]) for p in [long] + PROMPTS + [long[:200]] * 3]
    assert max(map(len, prompts)) > 128 and len(prompts) == KERNEL_ROWS + 2
    p = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    want = [generate(model, [q], p)[0] for q in prompts]
    steps = []
    for block in model.layers:  # count the fused steps that ran
        block.fused_step.plan = _CountingPlan(block.fused_step.plan, steps)
    engine.start()
    try:
        col = Collector()
        engine.submit(GenRequest(prompts[0], p, col, index=0))  # alone: one row
        col.wait(1)
        alone = col.tokens[0]
        rows_alone = list(steps)
        col = Collector()
        for i, q in enumerate(prompts):
            engine.submit(GenRequest(q, p, col, index=i))
        col.wait(len(prompts))
    finally:
        engine.stop()
        for block in model.layers:
            block.fused_step.plan = block.fused_step.plan.plan
    assert alone == want[0]
    assert set(rows_alone) == {1}, "a lone request was padded"
    assert [col.tokens[i] for i in range(len(prompts))] == want
    assert max(steps) == KERNEL_ROWS and engine.stats["peak_active"] == len(prompts)


class _CountingPlan:
    """A block plan that records how many rows each fused step it runs has."""

    def __init__(self, plan, rows: list):
        self.plan, self.rows = plan, rows

    def step(self, x, *args):
        self.rows.append(x.shape[0])
        return self.plan.step(x, *args)
