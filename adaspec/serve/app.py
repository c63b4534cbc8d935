"""The OpenAI-compatible HTTP application (FastAPI), the only place that knows HTTP and chat templates.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE), ``GET /v1/models``, ``GET /health``,
``GET /metrics``. Every error has the OpenAI shape; bad input is a 400 naming its parameter, never a 422 or a 500.
Tokenizing comes after the cheap checks and a place in the queue, so a burst of huge prompts is refused first; the
path of a request and the handling of learned state are on :func:`create_app`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from ..verify import SamplingParams
from . import errors
from .auth import KeyRing, bearer_matches, tenant_secret
from .errors import APIError, bad_request
from .metrics import ServerMetrics
from .scheduler import Job, NotAccepting, QueueFull, Scheduler, SchedulerConfig, Update
from .schemas import ChatCompletionRequest, CompletionRequest, parse_body, validation_error

log = logging.getLogger("adaspec.serve")

COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI completions default


@dataclass
class ServerConfig:
    """How the server runs; ``adaspec serve`` fills it from the command line."""

    model: str | None = None
    """HF model directory, .gguf file or a name in ``files.MODEL_ALIASES``; None = the bundled SmolLM2-135M-Instruct."""
    device: str | None = None
    """cpu or cuda; None = cuda when available."""
    backend: str = "auto"
    """auto, torch or llamacpp (see ``model.loader.choose_backend``)."""
    threads: int | None = None
    """llama.cpp's threads; None = one per core this process may use (torch's are set by ``--threads`` directly)."""
    mode: str = "adaptive"
    """Speculation setup passed to ``build_engine`` (adaptive, plain, ngram, suffix)."""
    state_dir: str | None = None
    """Directory of learned speculator state: restored at start, snapshotted on an interval and at shutdown."""
    api_keys: tuple[str, ...] = ()
    """Accepted bearer keys; empty = no authentication (one tenant)."""
    shared_namespace: bool = False
    """Every key learns into one shared namespace instead of one namespace per key (see ``auth``)."""
    max_active: int = 8
    """Requests generated concurrently, batched step by step."""
    max_queue: int = 64
    """Requests waiting for a slot before new ones get 429."""
    kv_memory_gib: float = 4.0
    """Memory for the running requests' KV caches together, on the torch backend (llama.cpp has its own fixed
    pool of cells); a request that would overflow it waits for a slot (``SchedulerConfig.kv_positions``)."""
    max_tokens_cap: int | None = None
    """Largest ``max_tokens`` a request may ask for; None = the model context."""
    snapshot_interval: float = 60.0
    """Seconds between learned-state snapshots (0 = only at shutdown); a kill -9 loses at most this much."""
    drain_timeout: float = 30.0
    """On SIGTERM, seconds to let running requests finish before cancelling them."""
    served_model_name: str | None = None
    """Model id in the API; None = the tokenizer's name, else the model file's stem."""
    max_body_bytes: int = 4 << 20
    """Largest request body accepted (413 beyond)."""
    metrics_key: str | None = None
    """Bearer key ``/metrics`` requires; None = open (for a scraper on a private network)."""

    @property
    def isolated_tenants(self) -> bool:
        """Several keys, each its own namespace: nothing learned from one tenant may shape another's drafts."""
        return bool(self.api_keys) and not self.shared_namespace

    def __post_init__(self) -> None:
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise ValueError("max_tokens_cap must be >= 1")
        if self.snapshot_interval < 0:
            raise ValueError("snapshot_interval must be >= 0")
        if self.drain_timeout < 0:
            raise ValueError("drain_timeout must be >= 0")
        SchedulerConfig(self.max_active, self.max_queue)  # validates both
        if not self.kv_memory_gib > 0:
            raise ValueError("kv_memory_gib must be > 0")


def kv_pool_positions(model: Any, gib: float) -> int | None:
    """KV positions all running requests may hold together: llama.cpp's cells, or ``gib`` of the torch
    backend's float caches (keys and values of every layer per position); None for a model that says neither."""
    cells = getattr(model, "cells", None)
    if isinstance(cells, int):
        return cells
    cfg = getattr(model, "cfg", None)
    try:
        per_position = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * model.dtype.itemsize
    except AttributeError:
        return None
    return max(1, int(gib * (1 << 30) // per_position))


@dataclass
class EngineBundle:
    """What the server needs from model loading."""

    engine: Engine
    tokenizer: Any  # encode(str) -> ids, decode(ids) -> str, apply_chat_template(messages) -> ids
    model_name: str
    snapshot: Callable[[], object] | None = None
    """Writes the learned state (atomically) to the state dir; called on the engine thread."""
    state_sizes: Callable[[], Mapping[tuple[str, str], float]] | None = None
    """(speculator, namespace) -> learned-state size, for /metrics; called on the engine thread."""


def load_bundle(cfg: ServerConfig) -> EngineBundle:
    """Load the model and build the engine with its learned state (the production path)."""
    from ..model.loader import load_target
    from ..system import build_engine

    model, tok = load_target(cfg.model, device=cfg.device, backend=cfg.backend, threads=cfg.threads)
    log.info("model %s on the %s backend (%s)", getattr(tok, "name", cfg.model), model.backend, model.backend_reason)
    engine = build_engine(model, tok, cfg.mode, state_dir=cfg.state_dir, shared_learning=not cfg.isolated_tenants)
    name = cfg.served_model_name or getattr(tok, "name", None) or (Path(cfg.model).stem if cfg.model else "model")
    return EngineBundle(engine, tok, str(name), _engine_snapshot(engine), _engine_state_sizes(engine))


def _engine_snapshot(engine: Engine) -> Callable[[], object] | None:
    """``engine.snapshot`` when the engine keeps learned state (``build_engine`` was given a state dir)."""
    return engine.snapshot if engine.keeps_state else None


def _engine_state_sizes(engine: Engine) -> Callable[[], Mapping[tuple[str, str], float]] | None:
    """(speculator, namespace) -> learned tokens, from each speculator's ``stats()["namespaces"][ns]["tokens"]``
    (the suffix speculator's report); None without speculators."""
    specs = list(engine.speculators)
    if not specs:
        return None

    def sizes() -> dict[tuple[str, str], float]:
        out: dict[tuple[str, str], float] = {}
        for s in specs:
            per = s.stats().get("namespaces")
            if isinstance(per, Mapping):
                for ns, v in per.items():
                    if isinstance(v, Mapping) and isinstance(v.get("tokens"), (int, float)):
                        out[(s.name, str(ns))] = float(v["tokens"])
        return out

    return sizes


class ServerState:
    """Lifecycle of one server: loading -> ready -> draining -> stopped."""

    def __init__(self, cfg: ServerConfig, loader: Callable[[ServerConfig], EngineBundle]):
        self.cfg = cfg
        self.loader = loader
        self.metrics = ServerMetrics()
        self.keys = KeyRing.build(cfg.api_keys, cfg.shared_namespace, tenant_secret(cfg.state_dir))
        self.bundle: EngineBundle | None = None
        self.scheduler: Scheduler | None = None
        self.status = "loading"  # loading | ready | draining | failed | stopped
        self.on_fatal: Callable[[str], None] | None = None  # set by the runner: stop the process
        self.started_at = int(time.time())
        self._snapshot_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    def start_loading(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        threading.Thread(target=self._load, name="adaspec-load", daemon=True).start()

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            bundle = self.loader(self.cfg)
        except Exception as e:
            log.error("could not load the model: %s", e)
            log.debug("model load failure", exc_info=True)
            self.status = "failed"
            if self.on_fatal is not None:
                self.on_fatal(str(e))
            return
        self.bundle = bundle
        sched_cfg = SchedulerConfig(self.cfg.max_active, self.cfg.max_queue,
                                    kv_pool_positions(bundle.engine.model, self.cfg.kv_memory_gib))
        self.scheduler = Scheduler(bundle.engine, self.metrics, sched_cfg, bundle.state_sizes)
        guard = getattr(bundle.engine, "guard", None)
        if guard is not None:
            self.metrics.guard.watch(guard.stats)
        if bundle.state_sizes is not None:
            self.scheduler.call(self.scheduler.publish_state_sizes)
        if self.status == "loading":
            self.status = "ready"
        log.info("model %s ready in %.1f s (mode %s, context %d)", bundle.model_name, time.perf_counter() - t0,
                 self.cfg.mode, bundle.engine.model.max_context)
        if self._loop is not None and bundle.snapshot is not None and self.cfg.snapshot_interval > 0:
            self._loop.call_soon_threadsafe(self._start_snapshots)

    def _start_snapshots(self) -> None:
        self._snapshot_task = asyncio.get_running_loop().create_task(self._snapshot_loop())

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.snapshot_interval)
            await self.snapshot_now()

    async def snapshot_now(self) -> bool:
        """Write the learned state now (on the engine thread); False if it failed or there is nothing to write."""
        if self.bundle is None or self.bundle.snapshot is None or self.scheduler is None:
            return False
        try:
            await asyncio.wrap_future(self.scheduler.call(self.bundle.snapshot))
        except NotAccepting:
            return False
        except Exception:
            log.exception("learned-state snapshot failed")
            self.metrics.snapshots.labels("error").inc()
            return False
        self.metrics.snapshots.labels("ok").inc()
        return True

    def begin_drain(self) -> None:
        """Stop admissions; /health turns 503; running requests go on."""
        if self.status in ("ready", "loading"):
            log.info("draining: new requests are refused")
        self.status = "draining" if self.status != "stopped" else self.status
        if self.scheduler is not None:
            self.scheduler.stop_admissions()

    @property
    def drained(self) -> bool:
        return self.scheduler is None or self.scheduler.idle

    def cancel_running(self) -> None:
        if self.scheduler is not None:
            running, waiting = self.scheduler.counts()
            if running or waiting:
                log.warning("drain timeout: cancelling %d running and %d waiting requests", running, waiting)
            self.scheduler.cancel_all("shutdown")

    async def shutdown(self) -> None:
        self.begin_drain()
        if self._snapshot_task is not None:
            self._snapshot_task.cancel()
        if self.scheduler is not None and self.bundle is not None:
            engine = self.bundle.engine
            await asyncio.to_thread(self.scheduler.shutdown, engine.close)
            log.info("engine stopped%s", "; learned state saved" if self.bundle.snapshot is not None else "")
        self.status = "stopped"

    # -- request helpers ----------------------------------------------------------------------------

    def require_ready(self) -> tuple[EngineBundle, Scheduler]:
        if self.status != "ready" or self.bundle is None or self.scheduler is None:
            raise errors.unavailable("draining" if self.status in ("draining", "stopped") else
                                     "failed" if self.status == "failed" else "loading")
        return self.bundle, self.scheduler

    def authenticate(self, request: Request) -> str:
        ns = self.keys.authenticate(request.headers.get("authorization"))
        if ns is None:
            raise errors.unauthorized()
        return ns

    def served_names(self) -> set[str]:
        names = set()
        if self.bundle is not None:
            names.add(self.bundle.model_name)
        if self.cfg.model:
            names.update({Path(self.cfg.model).name, Path(self.cfg.model).stem})
        return names


# -- the application -------------------------------------------------------------------------------------


def create_app(cfg: ServerConfig, loader: Callable[[ServerConfig], EngineBundle] = load_bundle) -> FastAPI:
    """The application for ``cfg``; ``loader`` builds the engine (in the background: ``/health`` says when).

    A request goes: key -> namespace (``auth``), body -> validated request
    (``schemas``) and the checks that need no tokenizer (model, prompt length in
    characters), a place in the queue (429 when full), then messages -> chat
    template -> token ids, checks against the context and the ``max_tokens`` cap,
    and a ``Job`` for the engine thread (``scheduler``). Tokenizing comes last
    because it is the expensive part: a burst of huge prompts is refused first.
    Updates come back through an ``asyncio.Queue``; a client that
    disconnects (detected by polling while a non-streaming request runs, or by the
    streaming response being cancelled) cancels its job.

    Learned state: ``build_engine`` restores it from ``state_dir`` and provides
    ``engine.snapshot()``, which runs on the engine thread every
    ``snapshot_interval`` seconds; at shutdown ``Engine.close()`` runs the engine's
    save hooks there too. With isolated tenants the engine is built without
    speculators that learn one model from every namespace (``shared_learning=False``).
    """
    state = ServerState(cfg, loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading(asyncio.get_running_loop())
        yield
        await state.shutdown()

    app = FastAPI(title="adaspec", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.adaspec = state
    _install_error_handlers(app, state)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = state.status == "ready"
        body: dict[str, Any] = {"status": state.status}
        if state.scheduler is not None:
            body["running"], body["waiting"] = state.scheduler.counts()
        return JSONResponse(body, status_code=200 if ok else 503)

    metrics_keys = (cfg.metrics_key.encode("utf-8"),) if cfg.metrics_key else None

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        if metrics_keys is not None and not bearer_matches(request.headers.get("authorization"), metrics_keys):
            raise errors.unauthorized()
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        state.authenticate(request)
        bundle, _ = state.require_ready()
        return JSONResponse({"object": "list", "data": [_model_card(bundle, state.started_at)]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> JSONResponse:
        state.authenticate(request)
        bundle, _ = state.require_ready()
        if model_id not in state.served_names():
            raise errors.model_not_found(model_id, bundle.model_name)
        return JSONResponse(_model_card(bundle, state.started_at))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(state, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(state, request, chat=True)

    return app


def _model_card(bundle: EngineBundle, created: int) -> dict:
    return {"id": bundle.model_name, "object": "model", "created": created, "owned_by": "adaspec",
            "max_model_len": bundle.engine.model.max_context}


def _install_error_handlers(app: FastAPI, state: ServerState) -> None:
    rejected = state.metrics.requests_rejected

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status in (400, 401, 404, 413, 429, 503) and request.url.path.startswith("/v1/"):
            rejected.labels(exc.code or str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = APIError(404, f"Unknown route {request.method} {_short(request.url.path)}.",
                           "invalid_request_error", None, "not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"Method {request.method} is not allowed on {_short(request.url.path)}.",
                           "invalid_request_error", None, "method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail) if exc.status_code < 500 else "Internal server error.",
                           "invalid_request_error" if exc.status_code < 500 else "internal_error", None, None)
        return err.response()

    app.add_middleware(_InternalErrors)


class _InternalErrors:
    """Turns an unexpected exception into the OpenAI-shaped 500 and keeps the connection open.

    (An ``Exception`` handler would run in Starlette's outermost middleware, which sends the 500 and then
    re-raises, so the server closes the keep-alive connection and the client's next request on it fails.)
    """

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:  # the response is half sent: this connection cannot carry another one
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), _short(scope.get("path", "")))
            await errors.internal_error().response()(scope, receive, send)


def _short(path: str) -> str:
    return path if len(path) <= 100 else path[:100] + "..."


# -- one generation request ---------------------------------------------------------------------------------


@dataclass
class _Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    want_stats: bool
    model_name: str


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"The request body is larger than {limit} bytes.", "invalid_request_error", None,
                       "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"The request body is larger than {limit} bytes.", "invalid_request_error", None,
                           "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_json(raw: bytes) -> Any:
    """The body as JSON that is also valid Unicode text; a 400 for anything else, never a parser crash."""
    if not raw.strip():
        raise bad_request("The request body is empty; send a JSON object.", None, "invalid_json")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise bad_request(f"The request body is not valid JSON{where}.", None, "invalid_json") from None
    except RecursionError:
        raise bad_request("The request body nests arrays or objects too deeply.", None, "invalid_json") from None
    try:  # JSON can escape lone surrogates ("\ud800"), which are not text: no tokenizer or response can hold them
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("The request body holds a lone surrogate escape (such as \\ud800), which is not valid "
                          "Unicode text.", None, "invalid_json") from None
    return data


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


PROMPT_CHARS_PER_TOKEN = 16
"""Text prompts longer than this many characters per token of model context are refused before tokenizing.
Natural text runs at 3-5 characters per token, so such a prompt cannot fit the context in practice; the check
keeps a burst of huge prompts from costing a tokenizer pass each before their 400."""


def _parse(state: ServerState, bundle: EngineBundle, raw: bytes, chat: bool) -> Any:
    """Body -> validated request, with every check that needs no tokenizer."""
    req = parse_body(ChatCompletionRequest if chat else CompletionRequest, _decode_json(raw))
    if req.model not in state.served_names():
        raise errors.model_not_found(req.model, bundle.model_name)
    context = bundle.engine.model.max_context
    chars, limit = req.prompt_chars(), context * PROMPT_CHARS_PER_TOKEN
    if chars > limit:
        raise APIError(400, f"The prompt is {chars} characters long; this server accepts at most {limit} "
                            f"({PROMPT_CHARS_PER_TOKEN} per token of the model's {context}-token context).",
                       "invalid_request_error", "messages" if chat else "prompt", "context_length_exceeded")
    return req


def _tokenize(encode: Callable[[], Any], param: str) -> list[int]:
    """Run a tokenizer on the client's text: what the tokenizer cannot take is the client's error (400)."""
    try:
        return [int(t) for t in encode()]
    except (ValueError, TypeError, UnicodeError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise bad_request(f"The text cannot be tokenized: {msg}", param) from None


def _prepare(state: ServerState, bundle: EngineBundle, req: Any, chat: bool) -> _Prepared:
    """Validated request -> token ids and sampling parameters (tokenizes: run it after admission)."""
    model = bundle.engine.model
    tok = bundle.tokenizer
    if chat:
        prompt_ids = _render_chat(tok, req.chat_messages())
        asked = req.requested_max_tokens()
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    else:
        p = req.prompt_value()
        if isinstance(p, str):
            prompt_ids = _tokenize(lambda: tok.encode(p), "prompt")
        else:
            bad = next((t for t in p if not 0 <= t < model.vocab_size), None)
            if bad is not None:
                raise bad_request(f"Token id {bad} in prompt is outside the vocabulary (0..{model.vocab_size - 1}).",
                                  "prompt")
            prompt_ids = list(p)
        asked = req.max_tokens
        param = "max_tokens"
    if not prompt_ids:
        raise bad_request("The prompt encodes to no tokens.", "prompt" if not chat else "messages")
    context = model.max_context
    cap = min(state.cfg.max_tokens_cap or context, context)
    room = context - len(prompt_ids)
    if asked is not None:
        if asked < 1:
            raise bad_request(f"{param} must be at least 1.", param)
        if asked > cap:
            raise bad_request(f"{param} must be at most {cap} on this server.", param)
        if asked > room:
            raise errors.context_length_exceeded(len(prompt_ids), asked, context)
        max_tokens = asked
    else:
        if room < 1:
            raise errors.context_length_exceeded(len(prompt_ids), 1, context)
        max_tokens = min(cap, room, COMPLETION_DEFAULT_MAX_TOKENS if not chat else cap)
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    try:
        params = SamplingParams(max_tokens=max_tokens,
                                temperature=1.0 if req.temperature is None else float(req.temperature),
                                top_p=1.0 if req.top_p is None else float(req.top_p), top_k=top_k,
                                seed=req.seed, stop=req.stop_list())
    except ValueError as e:
        raise bad_request(str(e)) from None
    return _Prepared(prompt_ids, params, bool(req.stream), req.include_usage, req.want_stats, bundle.model_name)


def _render_chat(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    try:
        ids = tok.apply_chat_template(messages)
    except Exception as e:
        # Template errors (e.g. "roles must alternate") and text the tokenizer cannot take are the client's; the
        # message comes from the template or the tokenizer.
        from jinja2 import TemplateError

        if isinstance(e, (TemplateError, ValueError, TypeError, UnicodeError)):
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise bad_request(f"The chat template cannot render these messages: {msg}", "messages") from None
        raise
    return [int(t) for t in ids]


class _Channel:
    """Updates from the engine thread to one request's coroutine."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[Update] = asyncio.Queue()

    def put(self, update: Update) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, update)

    async def next(self, timeout: float) -> Update | None:
        """The newest update (older unfinished ones are superseded: each carries the whole text), or None on timeout."""
        try:
            upd = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        while not upd.finished and not self.queue.empty():
            upd = self.queue.get_nowait()
        return upd


_POLL_S = 0.25  # how often a waiting request checks whether its client is still there


async def _generate(state: ServerState, request: Request, chat: bool):
    namespace = state.authenticate(request)
    bundle, scheduler = state.require_ready()
    raw = await _read_body(request, state.cfg.max_body_bytes)
    req = await asyncio.to_thread(_parse, state, bundle, raw, chat)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    channel = _Channel(asyncio.get_running_loop())
    try:
        with scheduler.reserve() as place:  # the 429 comes before the tokenizer runs
            prep = await asyncio.to_thread(_prepare, state, bundle, req, chat)  # a long prompt takes a while
            job = Job(rid, prep.prompt_ids, prep.params, namespace, channel.put, stream=prep.stream,
                      want_stats=prep.want_stats)
            scheduler.submit(job, place)
    except QueueFull:
        raise errors.queue_full(state.cfg.max_queue) from None
    except NotAccepting:
        raise errors.unavailable("draining") from None
    created = int(time.time())
    if prep.stream:
        return _CancellingStream(_sse(job, channel, prep, chat, created, request, scheduler), scheduler, job,
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    final = await _wait_final(job, channel, request, scheduler)
    _raise_for_update(final)
    return JSONResponse(_full_response(rid, chat, created, prep, final))


async def _wait_final(job: Job, channel: _Channel, request: Request, scheduler: Scheduler) -> Update:
    try:
        while True:
            upd = await channel.next(_POLL_S)
            if upd is not None and upd.finished:
                return upd
            if upd is None and await request.is_disconnected():
                scheduler.cancel(job, "client disconnected")
                log.info("request %s: client disconnected, generation cancelled", job.id)
    finally:
        if not job.done:
            scheduler.cancel(job, "client disconnected")


def _raise_for_update(upd: Update) -> None:
    if upd.error is None and upd.finish_reason != "cancelled":
        return
    if upd.error and upd.error.startswith("bad_request: "):
        raise bad_request(upd.error[len("bad_request: "):], "prompt")
    if upd.error and upd.error.startswith("unavailable: "):
        raise APIError(503, f"The server cannot finish this request now ({upd.error[len('unavailable: '):]}); "
                       "retry shortly.", "service_unavailable", None, "kv_cache_full", {"Retry-After": "1"})
    if upd.error == "shutdown" or upd.finish_reason == "cancelled":
        raise APIError(503, "The server shut down before the request finished.", "service_unavailable", None,
                       "shutdown")
    raise errors.internal_error()


def _usage(upd: Update) -> dict:
    return {"prompt_tokens": upd.prompt_tokens, "completion_tokens": upd.completion_tokens,
            "total_tokens": upd.prompt_tokens + upd.completion_tokens}


def _full_response(rid: str, chat: bool, created: int, prep: _Prepared, upd: Update) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": upd.text}, "logprobs": None,
                  "finish_reason": upd.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": upd.text, "logprobs": None, "finish_reason": upd.finish_reason}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": prep.model_name, "choices": [choice],
           "usage": _usage(upd)}
    if prep.want_stats:
        out["adaspec"] = {"stats": upd.stats}
    return out


def _chunk(rid: str, chat: bool, created: int, prep: _Prepared, text: str | None, finish: str | None,
           role: bool = False) -> dict:
    if chat:
        delta: dict[str, str] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": prep.model_name, "choices": [choice]}
    if prep.include_usage:
        out["usage"] = None
    return out


def _sse_data(obj: dict | str) -> bytes:
    body = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {body}\n\n".encode("utf-8")


async def _sse(job: Job, channel: _Channel, prep: _Prepared, chat: bool, created: int, request: Request,
               scheduler: Scheduler) -> AsyncIterator[bytes]:
    rid = job.id
    if chat:
        yield _sse_data(_chunk(rid, chat, created, prep, "", None, role=True))
    sent = ""
    while True:
        upd = await channel.next(_POLL_S)
        if upd is None:  # a disconnect cancels this response's task (``_CancellingStream``)
            continue
        if upd.finished and (upd.error is not None or upd.finish_reason == "cancelled"):
            err = _error_for_stream(upd)
            yield _sse_data(err.body())
            yield _sse_data("[DONE]")
            return
        text = upd.text
        if not text.startswith(sent):  # cannot happen with stable_text; never resend what the client has
            common = os.path.commonprefix([sent, text])
            log.warning("request %s: streamed text diverged at %d characters", rid, len(common))
            text = sent + text[len(common):] if len(text) > len(common) else sent
        delta = text[len(sent):]
        sent = text
        if delta:
            yield _sse_data(_chunk(rid, chat, created, prep, delta, None))
        if upd.finished:
            last = _chunk(rid, chat, created, prep, None if chat else "", upd.finish_reason)
            if prep.want_stats:
                last["adaspec"] = {"stats": upd.stats}
            yield _sse_data(last)
            if prep.include_usage:
                yield _sse_data({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                 "created": created, "model": prep.model_name, "choices": [], "usage": _usage(upd)})
            yield _sse_data("[DONE]")
            return


def _error_for_stream(upd: Update) -> APIError:
    try:
        _raise_for_update(upd)
    except APIError as e:
        return e
    return errors.internal_error()


class _CancellingStream(StreamingResponse):
    """A streaming response that cancels its job however the response ends (done, client gone, task cancelled)."""

    def __init__(self, content: AsyncIterator[bytes], scheduler: Scheduler, job: Job, **kw: Any):
        super().__init__(content, **kw)
        self._scheduler, self._job = scheduler, job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._job.done:
                log.info("request %s: stream closed early, generation cancelled", self._job.id)
                self._scheduler.cancel(self._job, "client disconnected")
