"""The OpenAI-compatible HTTP API (FastAPI) in front of the batching :class:`Engine`.

Clients written for OpenAI's API (the ``openai`` package, LangChain, curl scripts) talk to
evolm unchanged: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
with ``stream: true`` sent as server-sent events (``data: {chunk}`` lines, ending with
``data: [DONE]``), and errors as ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
status that names the offending field. ``GET /health`` reports the scheduler's state and ``GET /``
serves the chat page (``static/index.html``).

Request bodies are parsed strictly (a string where a number belongs is an error, not a guess)
but unknown fields are ignored, as OpenAI-compatible servers commonly do, so that clients that
send ``user`` or provider-specific extras keep working. Fields we cannot honour (tools, JSON
response formats, suffix, prompt logprobs) are refused with a clear 400 rather than ignored.

Nothing a client sends reaches the model or a 5xx unchecked: the body must be declared JSON
(415), fit ``max_body_bytes`` (413, read no further) and nest at most ``MAX_JSON_DEPTH`` deep
(400); every sampling parameter has a range (OpenAI's where it documents one; 400 otherwise, NaN
and infinity included); a text prompt that cannot fit the context is refused from its length in
bytes before it is tokenized. Tokenizing and rendering the chat template (itself under a budget:
``evolm.chat_template``) run off the event loop, so one heavy request does not stall the others.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from evolm.chat_template import TemplateBudgetError
from evolm.infer.sampling import SamplingParams
from evolm.infer.text import chat_prompt_ids
from evolm.serve.scheduler import DoneEvent, Engine, ErrorEvent, GenRequest, TokenEvent

log = logging.getLogger("evolm.serve")
STATIC = Path(__file__).parent / "static"
MAX_N = 16  # choices per request
MAX_LOGPROBS = 20
MAX_STOP = 16  # stop strings per request, each at most MAX_STOP_CHARS
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_BODY_BYTES = 8 * 2 ** 20  # default request-body limit: 16 prompts of 128k tokens as ids fit
MAX_JSON_DEPTH = 32  # the schema needs 5 (messages[i].content[j].text); tools' JSON schemas a few more
INT64 = 2 ** 63
MIN_TEMPERATURE = 1e-5  # below it, sampling is greedy decoding


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if not str(x).startswith(("function-", "union["))]
    # a union's branches add their type names to the location; keep the field path only
    path = ".".join(x for x in loc if x not in {"str", "int", "float", "bool", "list[str]", "list[int]",
                                                   "list[list[int]]", "list[ContentPart]", "none"})
    if err.get("type") == "missing":
        return APIError(400, f"'{path}' is a required property", param=path or None, code="missing_required_parameter")
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({err.get('msg')})", code="invalid_json")
    given = err.get("input")
    try:
        shown = json.dumps(given)[:80]
    except (TypeError, ValueError):
        shown = str(given)[:80]
    value_errors = {"less_than_equal", "greater_than_equal", "less_than", "greater_than", "too_short",
                    "too_long", "literal_error", "enum"}
    return APIError(400, f"invalid value for '{path}': {err.get('msg')} (got {shown})", param=path or None,
                    code="invalid_value" if err.get("type") in value_errors else "invalid_type")


# ------------------------------------------------------------------------------------------
# request bodies (strict types; unknown fields ignored)
# ------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=-INT64, lt=INT64)  # int64, as OpenAI and vLLM take it
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # extensions that vLLM and llama.cpp's server accept too; top_k -1 or 0: off (at most the vocabulary)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    # divides positive logits (HF's rule): far outside this range the logits overflow
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=10)
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1)


class ImageURL(_Body):
    url: str  # a data: URI (data:image/png;base64,...); the server fetches nothing from the network
    detail: Optional[str] = None


class ContentPart(_Body):
    type: str
    text: Optional[str] = None
    image_url: Union[ImageURL, str, None] = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None


# ------------------------------------------------------------------------------------------
# the app
# ------------------------------------------------------------------------------------------
def create_app(engine: Engine, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving ``engine``'s model as ``model_name``; starts/stops the engine.
    Request bodies over ``max_body_bytes`` are refused (413) without being read."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="evolm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = engine.tokenizer
    created = int(time.time())
    served = _Served(engine, model_name, tokenizer)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}"
        if e.status_code == 404:
            msg = f"unknown endpoint {request.method} {request.url.path}; see GET /v1/models, POST " \
                  f"/v1/completions, POST /v1/chat/completions, GET /health"
        return APIError(e.status_code, msg, code=kind).response()

    @app.exception_handler(RequestValidationError)
    async def _fastapi_validation(request: Request, e: RequestValidationError):
        return APIError(400, f"invalid request: {e.errors()[:1]}").response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error")
        return APIError(500, f"internal server error: {type(e).__name__}: {e}", type="server_error").response()

    def auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise APIError(401, "no API key given: send the header 'Authorization: Bearer <key>' "
                                "(the server was started with --api-key)", code="invalid_api_key")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key given in the Authorization header", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "evolm",
                "max_model_len": engine.max_len}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        snap = engine.snapshot()
        if not engine.alive:
            return JSONResponse({"status": "error", "error": engine.error, **snap}, status_code=503)
        return {"status": "ok", "model": model_name, **snap}

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        auth(request)
        if model_id != model_name:
            raise APIError(404, f"the model '{model_id}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        auth(request)
        body = await _parse(request, CompletionRequest, max_body_bytes)
        served.check_model(body.model)
        if body.suffix:
            raise APIError(400, "'suffix' (insertion) is not supported by this server", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "'best_of' other than n is not supported by this server", param="best_of")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "'echo' with 'logprobs' (prompt logprobs) is not supported by this server",
                           param="echo")
        prompts = await asyncio.to_thread(served.completion_prompts, body.prompt)
        return await served.run(request, body, prompts, chat=False, default_max=16,
                                n_logprobs=body.logprobs, max_tokens=body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        auth(request)
        body = await _parse(request, ChatRequest, max_body_bytes)
        served.check_model(body.model)
        if body.tools:
            raise APIError(400, "tool calling ('tools') is not supported by this server", param="tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, f"response_format {body.response_format.get('type')!r} is not supported; "
                                f"only 'text'", param="response_format")
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        prompt, image = await asyncio.to_thread(served.chat_prompt, body.messages)
        n_lp = (body.top_logprobs or 0) if body.logprobs else None
        return await served.run(request, body, [prompt], chat=True, default_max=None, n_logprobs=n_lp,
                                max_tokens=body.max_completion_tokens or body.max_tokens, image=image)

    return app


async def _parse(request: Request, cls: type[_Body], limit: int) -> Any:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json', "
                            f"got {media or 'no Content-Type'!r}", code="unsupported_media_type")
    raw = await _read_body(request, limit)
    too_deep = APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:  # nested deeper than Python parses
        raise too_deep from None
    if _depth(obj) > MAX_JSON_DEPTH:
        raise too_deep
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(obj).__name__}",
                       code="invalid_json")
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        raise _validation_error(e) from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read no further than ``limit`` bytes: a declared length over it is refused at
    once, a chunked body as soon as it passes it."""
    too_big = APIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                            f"(evolm serve --max-body-bytes)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _depth(obj: Any) -> int:
    """How deep JSON containers nest (iteratively: the point is bodies too deep to recurse on)."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        x, d = todo.pop()
        if isinstance(x, (dict, list)):
            deepest = max(deepest, d)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            todo.extend((v, d + 1) for v in (x.values() if isinstance(x, dict) else x))
    return deepest


# ------------------------------------------------------------------------------------------
# turning requests into engine work and engine events into OpenAI responses
# ------------------------------------------------------------------------------------------
class _Served:
    def __init__(self, engine: Engine, name: str, tokenizer):
        self.engine, self.name, self.tok = engine, name, tokenizer
        self._piece_cache: dict[int, str] = {}
        self.bytes_per_token = _max_bytes_per_token(tokenizer)

    def check_text_length(self, text: str, where: str) -> None:
        """Refuse, before tokenizing it, a text that cannot fit the context: no token stands for
        more than ``bytes_per_token`` bytes, so it has at least len(bytes) / that many tokens."""
        if self.bytes_per_token is None or len(text) < self.engine.max_len:
            return
        least = len(text.encode("utf-8", "surrogatepass")) // self.bytes_per_token
        if least >= self.engine.max_len:
            raise APIError(400, f"the {where} is too long: {len(text)} characters are at least {least} tokens "
                                f"(no token of this vocabulary is longer than {self.bytes_per_token} bytes), and "
                                f"this model's context length is {self.engine.max_len} tokens",
                           param=where, code="context_length_exceeded")

    # --- inputs ------------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.name}' "
                                f"(see GET /v1/models)", param="model", code="model_not_found")

    def completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "'prompt' is empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        if len(prompt) > MAX_N:
            raise APIError(400, f"at most {MAX_N} prompts per request, got {len(prompt)}", param="prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                self.check_text_length(p, "prompt")
            ids = list(self.tok.encode(p)) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "'prompt' is empty (it tokenizes to no tokens)", param="prompt")
            bad = [t for t in ids if not 0 <= t < self.engine.vocab]
            if bad:
                raise APIError(400, f"prompt token ids must be in [0, {self.engine.vocab}), got {bad[:5]}",
                               param="prompt")
            out.append(ids)
        return out

    def chat_prompt(self, messages: list[ChatMessage]) -> tuple[list[int], Any]:
        """The rendered prompt's ids, and the pixels of its image (None without one)."""
        if not getattr(self.tok, "chat_template", None):
            raise APIError(400, f"the model '{self.name}' has no chat template; use /v1/completions",
                           param="messages")
        conv, images = [], []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):
                parts = [self._content_part(part, f"messages.{i}.content.{j}", images)
                         for j, part in enumerate(content)]
                # a template reads the parts where there is an image (HF's {"type": "image"}), else one string
                content = parts if any(p["type"] == "image" for p in parts) else "".join(p["text"] for p in parts)
            conv.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        ids = self._render(conv)
        if not images:
            return ids, None
        from evolm.images import ImageError
        from evolm.infer.vision import check_image_tokens, expand_image_tokens, load_images

        try:
            ids = expand_image_tokens(self.engine.model, ids)
            check_image_tokens(self.engine.model, torch.tensor([ids]), 1)
            return ids, load_images(self.engine.model, images[0])
        except ImageError as e:
            raise APIError(400, f"messages: {e} (does the model's chat template place the image?)",
                           param="messages", code="invalid_image") from None

    def _content_part(self, part: ContentPart, where: str, images: list) -> dict:
        """A text part as it is; an ``image_url`` part checked (a vision model, one base64 data URI,
        an image PIL reads) and its image kept."""
        if part.type == "text" and part.text is not None:
            return {"type": "text", "text": part.text}
        if part.type != "image_url":
            raise APIError(400, f"{where}: content parts are 'text' or 'image_url', got type {part.type!r}",
                           param=where)
        if getattr(self.engine.model.config, "vision", None) is None:
            raise APIError(400, f"{where}: the model '{self.name}' reads no images (it has no vision encoder); "
                                f"send text only", param=where, code="images_not_supported")
        url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
        if not url:
            raise APIError(400, f"{where}: an image_url part needs image_url.url", param=f"{where}.image_url")
        if not url.startswith("data:"):
            raise APIError(400, f"{where}: image_url.url must be a data: URI (data:image/png;base64,...); this "
                                f"server fetches no URLs", param=f"{where}.image_url", code="invalid_image")
        if images:
            raise APIError(400, f"{where}: one image per request is supported", param=where, code="invalid_image")
        from evolm.images import ImageError, load_image

        try:
            images.append(load_image(url))
        except ImageError as e:
            raise APIError(400, f"{where}: {e}", param=f"{where}.image_url", code="invalid_image") from None
        return {"type": "image"}

    def _render(self, conv: list[dict]) -> list[int]:
        """The conversation through the chat template, as token ids."""
        try:
            text = self.tok.apply_chat_template(conv, add_generation_prompt=True)
            if not isinstance(text, str):  # a tokenizer that renders ids itself
                return chat_prompt_ids(self.tok, conv)
        except TemplateBudgetError as e:  # a hostile template, or messages too large for it
            raise APIError(400, f"the model's chat template cannot render these messages: {e}", param="messages",
                           code="chat_template_budget_exceeded") from None
        except Exception as e:  # the template's own raise_exception (e.g. roles out of order)
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        self.check_text_length(text, "messages")
        ids = list(self.tok.encode(text, add_special_tokens=False))  # the template wrote any BOS
        if not ids:
            raise APIError(400, "the messages render to an empty prompt", param="messages")
        return ids

    def _params(self, body: _Sampling, max_new: int, choice: int) -> SamplingParams:
        temperature = 1.0 if body.temperature is None else float(body.temperature)
        top_p = 1.0 if body.top_p is None else float(body.top_p)
        if top_p == 0:  # OpenAI accepts 0: only the most likely token survives
            temperature, top_p = 0.0, 1.0
        if temperature < MIN_TEMPERATURE:  # logits / 1e-308 overflow: this close to 0 is greedy (as vLLM)
            temperature = 0.0
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
            raise APIError(400, f"'stop' takes up to {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} "
                                f"characters", param="stop")
        if body.top_k is not None and body.top_k > self.engine.vocab:
            raise APIError(400, f"invalid value for 'top_k': at most the vocabulary size {self.engine.vocab} "
                                f"(or 0 / -1 for all tokens), got {body.top_k}", param="top_k", code="invalid_value")
        seed = None if body.seed is None else (body.seed + choice) % (2 ** 63)
        try:
            return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                                  top_k=max(body.top_k or 0, 0), min_p=body.min_p or 0.0,
                                  repetition_penalty=body.repetition_penalty or 1.0,
                                  seed=seed, stop=stop, ignore_eos=body.ignore_eos)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def _logit_bias(self, body: _Sampling) -> dict[int, float] | None:
        if not body.logit_bias:
            return None
        if len(body.logit_bias) > MAX_LOGIT_BIAS:
            raise APIError(400, f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(body.logit_bias)}",
                           param="logit_bias")
        out = {}
        for k, v in body.logit_bias.items():
            if not k.lstrip("-").isdigit() or not 0 <= int(k) < self.engine.vocab:
                raise APIError(400, f"logit_bias keys must be token ids in [0, {self.engine.vocab}), got {k!r}",
                               param="logit_bias")
            if not -100 <= v <= 100:
                raise APIError(400, f"logit_bias values must be in [-100, 100], got {v}", param="logit_bias")
            out[int(k)] = float(v)
        return out

    # --- running -----------------------------------------------------------------------------
    async def run(self, request: Request, body: _Sampling, prompts: list[list[int]], chat: bool,
                  default_max: int | None, n_logprobs: int | None, max_tokens: int | None, image=None):
        ctx = self.engine.max_len
        longest = max(len(p) for p in prompts)
        where = "messages" if chat else "prompt"
        if max_tokens is not None and max_tokens >= ctx:
            raise APIError(400, f"max_tokens={max_tokens} is too large: this model's context length is {ctx} "
                                f"tokens (prompt + max_tokens)", param="max_tokens", code="context_length_exceeded")
        if max_tokens is None:
            max_new = ctx - longest if default_max is None else min(default_max, ctx - longest)
            if max_new < 1:
                raise APIError(400, f"the prompt has {longest} tokens, which leaves no room to generate in this "
                                    f"model's context of {ctx} tokens", param=where, code="context_length_exceeded")
        else:
            max_new = max_tokens
            if longest + max_new > ctx:
                raise APIError(400, f"this model's maximum context length is {ctx} tokens; your request has "
                                    f"{longest} prompt tokens + max_tokens={max_new} = {longest + max_new}. "
                                    f"Shorten the {where} or lower max_tokens", param=where,
                               code="context_length_exceeded")
        bias = self._logit_bias(body)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliver(ev) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        reqs = []
        for pi, p in enumerate(prompts):
            for j in range(body.n):
                index = pi * body.n + j
                reqs.append(GenRequest(p, self._params(body, max_new, j), deliver, index=index,
                                       logprobs=n_logprobs, presence_penalty=body.presence_penalty or 0.0,
                                       frequency_penalty=body.frequency_penalty or 0.0, logit_bias=bias,
                                       image=image))
        submitted = []
        try:
            for r in reqs:
                submitted.append(self.engine.submit(r))
        except OverflowError as e:
            for r in submitted:
                r.cancel()
            raise APIError(429, str(e), type="server_error", code="server_busy") from None
        except RuntimeError as e:
            for r in submitted:
                r.cancel()
            raise APIError(503, str(e), type="server_error", code="engine_unavailable") from None
        except ValueError as e:
            for r in submitted:
                r.cancel()
            raise APIError(400, str(e), param=where) from None
        prompt_tokens = sum(len(p) for p in prompts)
        meta = _Meta(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time()), self.name,
                     prompt_tokens, chat, n_logprobs, body)
        if body.echo if not chat else False:
            meta.echo = [self.tok.decode(p) for p in prompts]
        if body.stream:
            return StreamingResponse(self._stream(request, queue, reqs, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, queue, reqs, meta)

    async def _events(self, request: Request, queue: asyncio.Queue, reqs: list[GenRequest]) -> AsyncIterator:
        """Events of all choices as they come; cancels the work if the client goes away."""
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        live = len(reqs)
        try:
            while live:
                if watcher.done():
                    return  # client disconnected
                if not queue.empty():  # events already here (a busy stream): no waiting machinery
                    ev = queue.get_nowait()
                else:
                    getter = asyncio.ensure_future(queue.get())
                    done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                        return  # client disconnected
                    ev = getter.result()
                if isinstance(ev, (DoneEvent, ErrorEvent)):
                    live -= 1
                yield ev
        finally:
            watcher.cancel()
            for r in reqs:
                r.cancel()  # no-op for finished ones; frees the slot of any still running

    async def _collect(self, request: Request, queue, reqs, meta: "_Meta"):
        choices: dict[int, dict] = {}
        completion_tokens = 0
        async with aclosing(self._events(request, queue, reqs)) as events:
            async for ev in events:
                c = choices.setdefault(ev.index, {"text": [], "lp": []})
                if isinstance(ev, TokenEvent):
                    c["text"].append(ev.text)
                    if meta.n_logprobs is not None:
                        c["lp"].append(ev)
                elif isinstance(ev, DoneEvent):
                    c["text"].append(ev.text)
                    c["finish"] = ev.finish_reason
                    completion_tokens += ev.completion_tokens
                else:
                    raise _generation_error(ev)
        if len([c for c in choices.values() if "finish" in c]) != len(reqs):
            return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
        out = []
        for i in sorted(choices):
            c = choices[i]
            text = "".join(c["text"])
            if meta.echo:
                text = meta.echo[i // meta.body.n] + text
            lp = self._logprobs(c["lp"], meta) if meta.n_logprobs is not None else None
            if meta.chat:
                out.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                            "finish_reason": c["finish"]})
            else:
                out.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c["finish"]})
        return {"id": meta.id, "object": "chat.completion" if meta.chat else "text_completion",
                "created": meta.created, "model": meta.model, "system_fingerprint": None, "choices": out,
                "usage": meta.usage(completion_tokens)}

    async def _stream(self, request: Request, queue, reqs, meta: "_Meta") -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if meta.chat else "text_completion"
        include_usage = bool(meta.body.stream_options and meta.body.stream_options.include_usage)

        def chunk(choices: list, usage: dict | None = None) -> str:
            d = {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model,
                 "system_fingerprint": None, "choices": choices}
            if include_usage or usage is not None:
                d["usage"] = usage
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

        def choice(index: int, text: str | None, finish: str | None = None, lp=None, role: bool = False) -> dict:
            if meta.chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}

        n_choices = len(reqs)
        if meta.chat:  # OpenAI opens each choice with the assistant role
            yield chunk([choice(i, "", role=True) for i in range(n_choices)])
        elif meta.echo:
            yield chunk([choice(i, meta.echo[i // meta.body.n]) for i in range(n_choices)])
        pending: dict[int, list[TokenEvent]] = {}
        completion_tokens = 0
        finished = 0
        async with aclosing(self._events(request, queue, reqs)) as events:
            async for ev in events:
                if isinstance(ev, ErrorEvent):
                    yield f"data: {json.dumps(_generation_error(ev).body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                lps = pending.setdefault(ev.index, [])
                if isinstance(ev, TokenEvent):
                    if meta.n_logprobs is not None:
                        lps.append(ev)
                    if not ev.text:
                        continue  # held back (part of a character or of a stop string): nothing to show yet
                    lp = self._logprobs(lps, meta) if meta.n_logprobs is not None else None
                    pending[ev.index] = []
                    yield chunk([choice(ev.index, ev.text, lp=lp)])
                else:
                    completion_tokens += ev.completion_tokens
                    finished += 1
                    lp = self._logprobs(lps, meta) if meta.n_logprobs is not None and lps else None
                    pending[ev.index] = []
                    if ev.text:
                        yield chunk([choice(ev.index, ev.text, lp=lp)])
                        lp = None
                    last = finished == n_choices
                    usage = meta.usage(completion_tokens) if last and not include_usage else None
                    yield chunk([choice(ev.index, None if meta.chat else "", ev.finish_reason, lp)], usage)
        if finished != n_choices:
            return  # client gone
        if include_usage:
            yield chunk([], meta.usage(completion_tokens))
        yield "data: [DONE]\n\n"

    # --- logprobs ----------------------------------------------------------------------------
    def _piece(self, t: int) -> str:
        if t not in self._piece_cache:
            self._piece_cache[t] = self.tok.decode([t])
        return self._piece_cache[t]

    def _logprobs(self, events: list[TokenEvent], meta: "_Meta") -> dict:
        if meta.chat:
            content = []
            for ev in events:
                s = self._piece(ev.token_id)
                content.append({"token": s, "logprob": ev.logprob, "bytes": list(s.encode("utf-8")),
                                "top_logprobs": [{"token": self._piece(t), "logprob": lp,
                                                  "bytes": list(self._piece(t).encode("utf-8"))}
                                                 for t, lp in (ev.top_logprobs or [])]})
            return {"content": content}
        tokens, token_lps, tops, offsets = [], [], [], []
        offset = meta.offsets.get(events[0].index, 0) if events else 0
        for ev in events:
            s = self._piece(ev.token_id)
            tokens.append(s)
            token_lps.append(ev.logprob)
            top: dict[str, float] = {}
            for t, lp in ev.top_logprobs or []:
                top.setdefault(self._piece(t), lp)
            tops.append(top)
            offsets.append(offset)
            offset += len(ev.text)
        if events:
            meta.offsets[events[0].index] = offset
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


class _Meta:
    """What every response chunk of one request repeats."""

    def __init__(self, id: str, created: int, model: str, prompt_tokens: int, chat: bool,
                 n_logprobs: int | None, body):
        self.id, self.created, self.model = id, created, model
        self.prompt_tokens, self.chat, self.n_logprobs, self.body = prompt_tokens, chat, n_logprobs, body
        self.echo: list[str] | None = None
        self.offsets: dict[int, int] = {}  # completions logprobs: text offset reached per choice

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}


def _max_bytes_per_token(tokenizer) -> int | None:
    """The most bytes of text one token can stand for (added tokens included), from the
    vocabulary's spelled-out tokens, which are never shorter than the text they match: byte-level
    and byte-fallback spellings and SentencePiece's '▁' take at least as many bytes. A normalizer
    (NFKC, lowercasing) may shorten text first; a factor of 4 covers the ones LMs use. ``None``
    (no bound) for a tokenizer without a ``tokenizers`` vocabulary."""
    backend = getattr(tokenizer, "backend", None)
    try:
        vocab = backend.get_vocab(with_added_tokens=True)
    except Exception:  # not a tokenizers.Tokenizer
        return None
    longest = max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=0)
    if not longest:
        return None
    return longest * (1 if backend.normalizer is None else 4)


def _generation_error(ev: ErrorEvent) -> APIError:
    return APIError(500, f"generation failed: {ev.message}", type="server_error", code="generation_error")


async def _wait_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


__all__ = ["create_app", "APIError"]
