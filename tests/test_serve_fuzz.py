"""The OpenAI endpoints against what a careless or hostile client sends, in process.

A tiny random-weight Llama (three layers, a 64-token context) behind the real app
(``evolm.serve.app.create_app``) and the real scheduler, driven by Starlette's test client:

- a table of malformed requests, each with the status it must get (and cheap ones first: a
  declared 100 MB body is refused without being read, a 2 MB prompt before it is tokenized);
- a schema-driven fuzz (``hypothesis``, derandomized) of /v1/completions and
  /v1/chat/completions: every field drawn valid, invalid (wrong type, out of range, NaN, too
  deep) or wild (arbitrary JSON, lone surrogates), plus unknown fields. Checked for each request:
  no 5xx; every 4xx carries an OpenAI error body; a body with an invalid field is never accepted;
  a body of valid fields always is. Then the server still answers a normal request.

The counts per outcome are printed (``pytest -s``) and recorded in docs/security.md.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter

import pytest

pytest.importorskip("fastapi", reason="serving needs fastapi: pip install 'evolm[serve]'")
pytest.importorskip("httpx", reason="the test client needs httpx")
hypothesis = pytest.importorskip("hypothesis", reason="the fuzz test needs hypothesis (dev extra)")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MODEL = "tiny"
CTX = 64
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module")
def tiny():
    """(test client, tokenizer): a random-weight tiny Llama with a BPE vocabulary of its own."""
    import torch

    from evolm.model import build
    from evolm.presets import get_preset
    from evolm.serve.app import create_app
    from evolm.serve.scheduler import Engine
    from evolm.tokenizer import train_bpe

    text = ["The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?",
            "Numbers 12345 and symbols !?.,;:"] * 30
    tok = train_bpe(iter(text), vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    chat_template=CHATML)
    torch.manual_seed(0)
    model = build(get_preset("tiny-llama").replace(vocab_size=tok.vocab_size, max_seq_len=CTX)).eval()
    engine = Engine(model, tok, max_batch=4, max_len=CTX)
    with TestClient(create_app(engine, MODEL)) as client:
        yield client, tok


def post(client, path: str, body, content_type: str | None = "application/json", **kw):
    headers = {"Content-Type": content_type} if content_type else {}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post(path, content=data, headers=headers, **kw)


def check_error_body(r) -> dict:
    """An OpenAI error: {"error": {"message", "type", "param", "code"}}, with a message."""
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"], err
    return err


def normal_request_works(client) -> None:
    r = post(client, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


# ------------------------------------------------------------------------------------------
# the malformed-request table
# ------------------------------------------------------------------------------------------
C, CH = "/v1/completions", "/v1/chat/completions"
OK = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def _deep(n: int) -> bytes:
    return b'{"model": "tiny", "prompt": "x", "user": ' + b"[" * n + b"]" * n + b"}"


# (request kind, path, body, content type, status, error code or None)
MALFORMED = [
    ("Content-Type text/plain", C, OK, "text/plain", 415, "unsupported_media_type"),
    ("no Content-Type", C, OK, None, 415, "unsupported_media_type"),
    ("form-encoded body", C, "model=tiny&prompt=x", "application/x-www-form-urlencoded", 415, None),
    ("body over the size limit (9 MiB)", C, b" " * (9 * 2 ** 20), "application/json", 413, "request_too_large"),
    ("JSON nested 50,000 deep", C, _deep(50_000), "application/json", 400, "invalid_json"),
    ("JSON nested 33 deep", C, _deep(33), "application/json", 400, "invalid_json"),
    ("not JSON", C, b"{not json", "application/json", 400, "invalid_json"),
    ("not UTF-8", C, b"\xff\xfe", "application/json", 400, "invalid_json"),
    ("JSON array body", C, [1, 2], "application/json", 400, "invalid_json"),
    ("JSON null body", C, b"null", "application/json", 400, "invalid_json"),
    ("temperature NaN", C, b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "application/json", 400, None),
    ("temperature Infinity", C, b'{"model": "tiny", "prompt": "x", "temperature": Infinity}', "application/json",
     400, None),
    ("temperature 2.5", C, {**OK, "temperature": 2.5}, "application/json", 400, "invalid_value"),
    ("top_p 1.5", C, {**OK, "top_p": 1.5}, "application/json", 400, "invalid_value"),
    ("repetition_penalty 1e-300", C, {**OK, "repetition_penalty": 1e-300}, "application/json", 400,
     "invalid_value"),
    ("repetition_penalty 0", C, {**OK, "repetition_penalty": 0}, "application/json", 400, "invalid_value"),
    ("repetition_penalty 1e300", C, {**OK, "repetition_penalty": 1e300}, "application/json", 400,
     "invalid_value"),
    ("top_k 1e12 (a float)", C, {**OK, "top_k": 1e12}, "application/json", 400, "invalid_type"),
    ("top_k 10**12", C, {**OK, "top_k": 10 ** 12}, "application/json", 400, "invalid_value"),
    ("top_k -2", C, {**OK, "top_k": -2}, "application/json", 400, "invalid_value"),
    ("min_p 1.5", C, {**OK, "min_p": 1.5}, "application/json", 400, "invalid_value"),
    ("seed 2**70", C, {**OK, "seed": 2 ** 70}, "application/json", 400, "invalid_value"),
    ("seed 2**63", C, {**OK, "seed": 2 ** 63}, "application/json", 400, "invalid_value"),
    ("presence_penalty 3", C, {**OK, "presence_penalty": 3}, "application/json", 400, "invalid_value"),
    ("frequency_penalty -2.5", C, {**OK, "frequency_penalty": -2.5}, "application/json", 400, "invalid_value"),
    ("n 0", C, {**OK, "n": 0}, "application/json", 400, "invalid_value"),
    ("n 10**9", C, {**OK, "n": 10 ** 9}, "application/json", 400, "invalid_value"),
    ("max_tokens 0", C, {**OK, "max_tokens": 0}, "application/json", 400, "invalid_value"),
    ("max_tokens 2**70", C, {**OK, "max_tokens": 2 ** 70}, "application/json", 400, "context_length_exceeded"),
    ("max_tokens '5'", C, {**OK, "max_tokens": "5"}, "application/json", 400, "invalid_type"),
    ("logprobs 21", C, {**OK, "logprobs": 21}, "application/json", 400, "invalid_value"),
    ("top_logprobs 21", CH, {**OK_CHAT, "logprobs": True, "top_logprobs": 21}, "application/json", 400,
     "invalid_value"),
    ("17 stop strings", C, {**OK, "stop": ["a"] * 17}, "application/json", 400, None),
    ("a 257-character stop string", C, {**OK, "stop": "a" * 257}, "application/json", 400, None),
    ("an empty stop string", C, {**OK, "stop": [""]}, "application/json", 400, None),
    ("logit_bias of 301 tokens", C, {**OK, "logit_bias": {str(i): 1 for i in range(301)}}, "application/json",
     400, None),
    ("logit_bias value 101", C, {**OK, "logit_bias": {"5": 101}}, "application/json", 400, None),
    ("prompt token id past the vocabulary", C, {**OK, "prompt": [10 ** 9]}, "application/json", 400, None),
    ("2 MB text prompt", C, {**OK, "prompt": "word " * 400_000}, "application/json", 400,
     "context_length_exceeded"),
    ("2 MB chat message", CH, {**OK_CHAT, "messages": [{"role": "user", "content": "word " * 400_000}]},
     "application/json", 400, "context_length_exceeded"),
    ("unknown model", C, {**OK, "model": "gpt-4"}, "application/json", 404, "model_not_found"),
    ("chat role 'robot'", CH, {**OK_CHAT, "messages": [{"role": "robot", "content": "x"}]}, "application/json",
     400, None),
    ("chat image part", CH, {**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "application/json", 400, None),
]


@pytest.mark.parametrize("kind,path,body,ctype,status,code", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_gets_its_status(tiny, kind, path, body, ctype, status, code):
    client, _ = tiny
    t = time.monotonic()
    r = post(client, path, body, ctype)
    took = time.monotonic() - t
    assert r.status_code == status, r.text[:300]
    err = check_error_body(r)
    if code is not None:
        assert err["code"] == code, err
    OUTCOMES[f"table {r.status_code}"] += 1
    assert took < 5.0, f"{kind}: {took:.1f} s"


def test_long_prompts_are_refused_before_tokenizing(tiny, monkeypatch):
    client, tok = tiny
    calls = []
    real = type(tok).encode

    def counting(self, text, *a, **k):
        calls.append(len(text))
        return real(self, text, *a, **k)

    monkeypatch.setattr(type(tok), "encode", counting)
    r = post(client, C, {**OK, "prompt": "word " * 400_000})
    assert r.status_code == 400 and check_error_body(r)["code"] == "context_length_exceeded"
    assert "at least" in r.json()["error"]["message"] and calls == []
    r = post(client, C, {**OK, "prompt": "word " * 3})  # short ones are tokenized as before
    assert r.status_code == 200 and calls


def test_a_body_over_the_limit_is_not_read(tiny):
    """A chunked body is read no further than the limit, and a declared length over the limit is
    refused before any of it is read (the ASGI app driven directly, so reads can be counted)."""
    import asyncio

    client, _ = tiny
    app = client.app

    def call(headers: list[tuple[bytes, bytes]], chunks: int) -> tuple[int, int]:
        reads, status = [0], []

        async def receive():
            reads[0] += 1
            if reads[0] > chunks:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": b" " * 2 ** 20, "more_body": reads[0] < chunks}

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": C, "raw_path": C.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), *headers], "client": ("127.0.0.1", 1),
                 "server": ("testserver", 80)}
        asyncio.run(app(scope, receive, send))
        return status[0], reads[0]

    status, reads = call([], chunks=200)  # 200 MiB, chunked
    assert status == 413 and reads <= 9  # the 8 MiB limit, then no more
    status, reads = call([(b"content-length", str(200 * 2 ** 20).encode())], chunks=200)
    assert status == 413 and reads == 0


def test_hostile_chat_template_is_refused_and_the_server_goes_on(tiny):
    """A template that would loop 10^10 times answers 400 within its time budget; completions
    and a sane template keep working."""
    client, tok = tiny
    saved = tok.chat_template
    tok.chat_template = ("{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
                         + CHATML)
    try:
        t = time.monotonic()
        r = post(client, CH, OK_CHAT)
        took = time.monotonic() - t
        assert r.status_code == 400, r.text
        err = check_error_body(r)
        assert err["code"] == "chat_template_budget_exceeded" and "loop iterations" in err["message"], err
        assert "chat template (" in err["message"] and took < 3.0
        normal_request_works(client)
    finally:
        tok.chat_template = saved
    assert post(client, CH, OK_CHAT).status_code == 200


# ------------------------------------------------------------------------------------------
# schema-driven fuzz
# ------------------------------------------------------------------------------------------
VALID, INVALID, WILD = "valid", "invalid", "wild"

words = st.text(alphabet="abcdefghij klmnop", min_size=1, max_size=12)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_any = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                               st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                        max_leaves=8)
deep = st.integers(33, 80).map(lambda n: json.loads("[" * n + "]" * n))
big_ints = st.sampled_from([2 ** 63, -2 ** 63 - 1, 2 ** 70, 10 ** 30, -10 ** 30])
not_numbers = st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.just({}), st.booleans())
bad_floats = st.sampled_from([math.nan, math.inf, -math.inf])
# lone surrogates, control characters, anything a client can put in a JSON string
wild_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=20)


def field(valid, invalid, wild=None):
    return {VALID: valid, INVALID: invalid, WILD: wild if wild is not None else json_any}


def numeric(lo: float, hi: float, integer: bool = False):
    if integer:
        valid = st.integers(int(lo), int(hi))
        invalid = st.one_of(st.integers(max_value=int(lo) - 1), st.integers(min_value=int(hi) + 1), big_ints,
                            st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)),
                            not_numbers)
    else:
        valid = st.one_of(st.floats(lo, hi), st.integers(math.ceil(lo), math.floor(hi)))
        invalid = st.one_of(st.floats(max_value=lo, exclude_max=True), st.floats(min_value=hi, exclude_min=True),
                            bad_floats, not_numbers)
    return field(st.one_of(st.none(), valid), invalid)


def common_fields(vocab: int) -> dict:
    token_ids = st.integers(0, vocab - 1)
    return {
        "model": field(st.just(MODEL), st.one_of(st.text(max_size=8).filter(lambda s: s != MODEL), st.integers(),
                                                 st.none())),
        "max_tokens": numeric(1, 8, integer=True) | {INVALID: st.one_of(st.integers(max_value=0),
                                                                        st.integers(min_value=CTX), big_ints,
                                                                        not_numbers, st.just(2.5))},
        "temperature": numeric(0, 2),
        "top_p": numeric(0, 1),
        "n": field(st.integers(1, 3), st.one_of(st.integers(max_value=0), st.integers(min_value=17), st.none(),
                                                not_numbers)),
        "stop": field(st.one_of(st.none(), words, st.lists(words, max_size=4)),
                      st.one_of(st.just(""), st.just([""]), st.lists(words, min_size=17, max_size=20),
                                st.just("s" * 257), st.integers(), st.lists(st.integers(), min_size=1, max_size=2))),
        "seed": field(st.one_of(st.none(), st.integers(-2 ** 63, 2 ** 63 - 1)), st.one_of(big_ints, not_numbers,
                                                                                        st.just(1.5))),
        "stream": field(st.booleans(), st.one_of(st.text(max_size=3), st.integers(), st.none())),
        "stream_options": field(st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()})),
                                st.one_of(st.just({"include_usage": "yes"}), st.just([]), st.integers())),
        "presence_penalty": numeric(-2, 2),
        "frequency_penalty": numeric(-2, 2),
        "logit_bias": field(st.one_of(st.none(), st.dictionaries(token_ids.map(str), st.floats(-100, 100),
                                                                 max_size=3)),
                            st.one_of(st.dictionaries(st.text("xyz", min_size=1, max_size=3), st.integers(),
                                                      min_size=1, max_size=2),
                                      st.just({str(vocab): 1}), st.just({"1": 101}), st.just({"1": "a"}),
                                      st.just({str(i): 1 for i in range(301)}), st.just([1]))),
        "user": field(st.one_of(st.none(), st.text(max_size=10)), st.one_of(st.integers(), st.lists(st.text()))),
        "top_k": field(st.one_of(st.none(), st.integers(-1, vocab)),
                       st.one_of(st.integers(max_value=-2), st.integers(min_value=vocab + 1), st.just(1e12),
                                 not_numbers)),
        "min_p": numeric(0, 1),
        "repetition_penalty": numeric(0.01, 10) | {INVALID: st.one_of(
            st.sampled_from([0, -1, 1e-300, 0.001, 10.5, 1e300]), st.floats(max_value=0.01, exclude_max=True),
            st.floats(min_value=10, exclude_min=True), bad_floats, not_numbers)},
        "ignore_eos": field(st.booleans(), st.one_of(st.integers(), st.text(max_size=3))),
        "extra": field(json_any, st.nothing()),  # unknown fields: ignored
    }


def completion_fields(vocab: int) -> dict:
    ids = st.lists(st.integers(0, vocab - 1), min_size=1, max_size=20)
    return {**common_fields(vocab), **{
        "prompt": field(st.one_of(words, st.lists(words, min_size=1, max_size=2), ids,
                                  st.lists(ids, min_size=1, max_size=2)),
                        st.one_of(st.just(""), st.just([]), st.just([[]]), st.just([-1]), st.just([vocab]),
                                  st.just([1, "a"]), st.integers(), st.just({}), st.just("word " * 200),
                                  st.lists(words, min_size=17, max_size=18), deep),
                        st.one_of(wild_text, json_any)),
        "logprobs": field(st.one_of(st.none(), st.integers(0, 5)),
                          st.one_of(st.integers(min_value=21), st.integers(max_value=-1), st.booleans(),
                                    st.text(max_size=2))),
        "echo": field(st.booleans(), st.one_of(st.text(max_size=2), st.integers())),
        "suffix": field(st.none(), st.one_of(st.just("x"), st.integers())),
        "best_of": field(st.none(), st.one_of(st.integers(max_value=0), st.integers(min_value=4), st.text(max_size=2))),
    }}


def chat_fields(vocab: int) -> dict:
    role = st.sampled_from(["system", "developer", "user", "assistant"])
    short = st.text(alphabet="abcdefghij klmnop", min_size=1, max_size=8)  # two turns fit the 64-token context
    content = st.one_of(st.none(), short,
                        st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": short}), max_size=2))
    message = st.fixed_dictionaries({"role": role, "content": content})
    bad_message = st.one_of(st.fixed_dictionaries({"role": st.just("robot"), "content": words}),
                            st.fixed_dictionaries({"role": role, "content": st.integers()}),
                            st.fixed_dictionaries({"content": words}),
                            st.fixed_dictionaries({"role": role, "content": st.just([{"type": "image_url"}])}),
                            st.fixed_dictionaries({"role": role, "content": deep}))
    return {**common_fields(vocab), **{
        "messages": field(st.lists(message, min_size=1, max_size=2),
                          st.one_of(st.just([]), words, st.integers(), st.lists(bad_message, min_size=1, max_size=2),
                                    st.just([{"role": "user", "content": "word " * 200}]), deep),
                          st.one_of(st.lists(st.fixed_dictionaries({"role": role, "content": wild_text}),
                                             min_size=1, max_size=2), json_any)),
        "max_completion_tokens": numeric(1, 8, integer=True),
        "logprobs": field(st.booleans(), st.one_of(st.integers(), st.text(max_size=2))),
        "top_logprobs": field(st.one_of(st.none(), st.integers(0, 5)),
                              st.one_of(st.integers(min_value=21), st.integers(max_value=-1), st.text(max_size=2))),
        "tools": field(st.one_of(st.none(), st.just([])), st.just([{"type": "function"}])),
        "tool_choice": field(json_any, st.nothing()),
        "response_format": field(st.one_of(st.none(), st.just({"type": "text"})),
                                 st.one_of(st.just({"type": "json_object"}), st.just("text"), st.integers())),
    }}


REQUIRED = {"model", "prompt", "messages"}


@st.composite
def bodies(draw, fields: dict):
    """A request body and the verdict the server must give it: 'valid' (200), 'invalid' (4xx) or
    'wild' (anything but a 5xx)."""
    body, kinds = {}, set()
    # all fields valid; exactly one invalid (the sharpest test of each range); or a mix
    mode = draw(st.sampled_from(["valid", "one", "one", "mix"]))
    bad = draw(st.sampled_from([5, 15, 30])) if mode == "mix" else 0  # percent of fields invalid or wild
    odd = [n for n, f in fields.items() if not f[INVALID].is_empty]
    one = draw(st.sampled_from(odd)) if mode == "one" else None
    for name, strategies in fields.items():
        if name not in REQUIRED and name != one and draw(st.integers(0, 99)) < 55:
            continue  # absent
        roll = draw(st.integers(0, 99))
        kind = INVALID if name == one else VALID if roll >= bad else INVALID if roll < bad * 2 // 3 else WILD
        if kind == INVALID and strategies[INVALID].is_empty:
            kind = VALID
        if name == "extra":
            body[draw(st.sampled_from(["user_id", "metadata", "vendor_x"]))] = draw(strategies[VALID])
            continue
        body[name] = draw(strategies[kind])
        kinds.add(kind)
        if kind == INVALID and name in REQUIRED and draw(st.booleans()):
            del body[name]  # a required field missing
    if INVALID not in kinds:  # combinations the server refuses although each field is fine
        if body.get("echo") and body.get("logprobs") is not None:
            kinds.add(INVALID)
        if body.get("top_logprobs") and not body.get("logprobs"):
            kinds.add(INVALID)
    verdict = INVALID if INVALID in kinds else WILD if WILD in kinds else VALID
    return body, verdict


def fuzz_one(client, path: str, body: dict, verdict: str) -> None:
    data = json.dumps(body, allow_nan=True)
    r = post(client, path, data)
    OUTCOMES[f"{path} {verdict} -> {r.status_code}"] += 1
    assert r.status_code < 500, (body, r.text[:500])
    if r.status_code >= 400:
        check_error_body(r)
        assert verdict != VALID, (body, r.text[:500])
    else:
        assert verdict != INVALID, (body, r.text[:300])
        if body.get("stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
            assert '"error"' not in r.text, r.text[-500:]
        else:
            assert r.json()["choices"], r.text[:300]


FUZZ = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("path, fields", [(C, completion_fields), (CH, chat_fields)], ids=["completions", "chat"])
def test_fuzz_endpoint(tiny, path, fields):
    client, tok = tiny

    @FUZZ
    @given(bodies(fields(tok.vocab_size)))
    def run(case):
        fuzz_one(client, path, *case)

    run()
    normal_request_works(client)


def test_fuzz_counts(tiny):
    """After everything above the server still answers; the outcome counts, printed."""
    client, _ = tiny
    normal_request_works(client)
    assert client.get("/health").json()["status"] == "ok"
    for key in sorted(OUTCOMES):
        print(f"{key}: {OUTCOMES[key]}")
    fuzzed = {k: v for k, v in OUTCOMES.items() if k.startswith("/v1")}
    if fuzzed:  # both kinds of answers really came
        assert any(" -> 200" in k for k in fuzzed) and any(" -> 400" in k for k in fuzzed), fuzzed
