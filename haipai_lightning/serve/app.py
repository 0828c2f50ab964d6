"""The HTTP routes: POST /v1/completions, GET /v1/models, /health, /metrics (FastAPI).

Why FastAPI + uvicorn and not LitServe: continuous batching needs one long-lived loop that owns the
engine and admits a request into the running batch at any tick (scheduler.py), with tokens streamed
back per request. LitServe batches whole requests (max_batch_size / batch_timeout, then one predict
call per batch) in worker processes behind its own queues, and its OpenAISpec speaks
/v1/chat/completions; fitting the engine in would mean bypassing both its batching and its spec.
FastAPI gives the routes and server-sent events (Starlette's StreamingResponse) and leaves the
scheduling to us; uvicorn gives graceful shutdown (server.py).

The wire format follows the OpenAI completions API: a `text_completion` object with choices
(text, index, logprobs, finish_reason) and usage; with "stream": true, server-sent events
`data: {chunk}` and a final `data: [DONE]` (https://platform.openai.com/docs/api-reference/completions).
Each choice also reports Haipai's `mean_recursion_depth`. Disconnects: a streaming response is
cancelled by Starlette when its client leaves; a plain one races its completion against
`http.disconnect`; either way the engine request is cancelled, so its slot frees at the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from haipai_lightning.decode.engine import Engine, Request
from haipai_lightning.decode.lookup import RenderingTokenizer
from haipai_lightning.decode.sampling import SamplingConfig
from haipai_lightning.decode.token_budget import budget_tokens
from haipai_lightning.serve.metrics import Metrics
from haipai_lightning.serve.protocol import APIError, CompletionParams, ServedModel, parse_completion
from haipai_lightning.serve.scheduler import Event, Job, QueueFull, Scheduler, ShuttingDown
from haipai_lightning.serve.textstream import TextStream

MAX_BODY = 1 << 20  # bytes; a context of a few thousand tokens is far below
CLIENT_CLOSED = 499  # nginx's status for "client closed request" (metrics only: nobody reads it)


class EngineFailed(Exception):
    pass


def build_app(model: Any, tokenizer: Any, model_id: str, max_batch: int = 8, max_queue: int = 64,
              lookup: Any = None) -> FastAPI:
    """`lookup`: a token hook set on every request (decode/lookup.py's LMLM LookupHook: `haipai serve --lookup`);
    the text sent back then shows each lookup call as its value."""
    max_len = model.cfg.max_seq_len
    text_tok = tokenizer if lookup is None else RenderingTokenizer(tokenizer)
    eos = tokenizer.token_to_id("<|endoftext|>") or 0  # as `haipai generate` (cli/generate.py)
    table = budget_tokens(tokenizer)  # token budgets the model was trained with (decode/token_budget.py)
    served = ServedModel(model_id, max_len, model.cfg.vocab_size, model.schedule.n_recursions, eos,
                         max_batch + max_queue, tuple(table.items()))
    metrics = Metrics(max_batch)
    scheduler = Scheduler(lambda: Engine(model, max_batch=max_batch, max_len=max_len, budget_tokens=table), max_queue, metrics)
    metrics.bind(scheduler.queue_length, scheduler.active, max_batch)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.stop()  # uvicorn has drained (or cancelled) the requests by now

    app = FastAPI(title="Haipai", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.metrics, app.state.served = scheduler, metrics, served

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(f"{exc.detail}: {request.method} {request.url.path}", None, exc.status_code)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: HTTPRequest, exc: Exception) -> JSONResponse:  # a bug: say so, as OpenAI does
        err = APIError(f"internal server error ({type(exc).__name__})", None, 500, "server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "haipai", "max_model_len": max_len,
                "n_recursions": served.n_recursions}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str) -> JSONResponse:
        if name != model_id:
            err = APIError(f"The model {name!r} does not exist", "model", 404, code="model_not_found")
            return JSONResponse(err.body(), status_code=404)
        return JSONResponse(model_card())

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Response:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        try:
            raw = await _read_body(request)
            p = parse_completion(raw, served, lambda s: tokenizer.encode(s).ids)
            reqs = [Request(ids, p.max_tokens, SamplingConfig(
                p.max_tokens, p.temperature, p.top_k, p.top_p, None if p.seed is None else p.seed + i),
                p.depth_budget, None if p.ignore_eos else eos, token_budget=p.token_budget, hook=lookup)
                for i, ids in enumerate(p.prompts)]
            jobs = scheduler.submit(reqs, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        except QueueFull as e:
            return _error(metrics, APIError(str(e), None, 429, "rate_limit_exceeded", "queue_full"))
        except ShuttingDown as e:
            return _error(metrics, APIError(str(e), None, 503, "server_error", "shutting_down"))
        except APIError as e:
            return _error(metrics, e)
        metrics.prompt_tokens.inc(sum(map(len, p.prompts)))
        run = _Run(p, jobs, queue, scheduler, text_tok, eos, model_id, metrics, t0)
        if p.stream:
            return _SSE(run.sse(), run.close, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await run.respond(request)

    return app


async def _read_body(request: HTTPRequest) -> bytes:
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > MAX_BODY:
        raise APIError(f"request body of {size} bytes is over the {MAX_BODY} byte limit", None, 413)
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > MAX_BODY:
            raise APIError(f"request body is over the {MAX_BODY} byte limit", None, 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _error(metrics: Metrics, e: APIError) -> JSONResponse:
    metrics.requests.labels(str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status)


class _SSE(StreamingResponse):
    """A StreamingResponse that runs `on_close` however it ends: finished, failed, or cancelled by Starlette
    when the client disconnects (the body generator itself may never resume to run a `finally`)."""

    def __init__(self, content: Any, on_close: Any, **kw: Any) -> None:
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class _Run:
    """One HTTP request's choices: engine events in, text deltas (and usage) out."""

    def __init__(self, p: CompletionParams, jobs: list[Job], queue: asyncio.Queue, scheduler: Scheduler,
                 tokenizer: Any, eos: int, model_id: str, metrics: Metrics, t0: float) -> None:
        self.p, self.jobs, self.queue, self.scheduler, self.metrics, self.t0 = p, jobs, queue, scheduler, metrics, t0
        self.streams = [TextStream(tokenizer, p.stop, eos) for _ in jobs]
        self.tokens = [0] * len(jobs)  # completion tokens of each choice (up to a stop string)
        self.finish: list[str | None] = [None] * len(jobs)
        self.depth: list[float | None] = [None] * len(jobs)
        self.id, self.created, self.model_id = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_id
        self.first_token = False
        self.closed = self.failed = False

    async def events(self) -> AsyncIterator[tuple[int, str]]:
        """(choice, new text) until every choice has finished; stop strings cancel their engine request."""
        while None in self.finish:
            ev = await self.queue.get()
            i = ev.index
            if self.finish[i] is not None:  # tokens decoded after a stop string: dropped
                continue
            if ev.error is not None:  # the engine ended every job of this request
                self.failed = True
                raise EngineFailed(ev.error)
            if ev.tokens and not self.first_token:
                self.first_token = True
                self.metrics.ttft.observe(time.perf_counter() - self.t0)
            ts = self.streams[i]
            delta = ts.push(ev.tokens)
            self.tokens[i] += len(ev.tokens)
            if ts.stopped:
                self.finish[i] = "stop"
                if ev.finish_reason is None:
                    self.scheduler.cancel(self.jobs[i])  # free the slot now, not after max_tokens
            elif ev.finish_reason is not None:
                delta += ts.finish()
                self.finish[i] = ev.finish_reason
            self.depth[i] = ev.mean_depth
            yield i, delta

    def usage(self) -> dict[str, int]:
        prompt, completion = sum(map(len, self.p.prompts)), sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _choice(self, i: int, text: str, final: bool) -> dict[str, Any]:
        c = {"text": text, "index": i, "logprobs": None, "finish_reason": self.finish[i] if final else None}
        if final:
            c["mean_recursion_depth"] = self.depth[i]
        return c

    def _object(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id,
                "choices": choices, "usage": usage}

    async def respond(self, request: HTTPRequest) -> Response:
        """The whole completion as one JSON object; a client that leaves first cancels its requests."""
        texts = [""] * len(self.jobs)

        async def collect() -> None:
            async for i, delta in self.events():
                texts[i] += delta

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (work, gone):
                t.cancel()
            self.close()
        if not work.done() or work.cancelled():  # the client left
            return Response(status_code=CLIENT_CLOSED)
        if isinstance(work.exception(), EngineFailed):
            return _error(self.metrics, APIError(str(work.exception()), None, 503 if "shutting down" in
                                                 str(work.exception()) else 500, "server_error"))
        work.result()  # anything else is a bug: the app's 500 handler answers
        self.metrics.requests.labels("200").inc()
        self.metrics.latency.observe(time.perf_counter() - self.t0)
        choices = [self._choice(i, t, True) for i, t in enumerate(texts)]
        return JSONResponse(self._object(choices, self.usage()))

    async def sse(self) -> AsyncIterator[bytes]:
        """Server-sent events: a chunk per text delta, the finish reason in each choice's last chunk."""
        try:
            async for i, delta in self.events():
                final = self.finish[i] is not None
                if delta or final:
                    yield _data(self._object([self._choice(i, delta, final)], None))
            if self.p.include_usage:  # OpenAI's stream_options: a last chunk with no choices and the usage
                yield _data(self._object([], self.usage()))
            self.metrics.requests.labels("200").inc()
            self.metrics.latency.observe(time.perf_counter() - self.t0)
        except EngineFailed as e:  # the status line is sent already: report in the stream, as OpenAI does
            self.metrics.requests.labels("500").inc()
            yield _data(APIError(str(e), None, 500, "server_error").body())
        yield b"data: [DONE]\n\n"

    def close(self) -> None:
        """Cancel what is still running (a disconnect); count it once."""
        if self.closed:
            return
        self.closed = True
        if None in self.finish and not self.failed:
            self.metrics.disconnects.inc()
            self.metrics.requests.labels(str(CLIENT_CLOSED)).inc()
        for job, end in zip(self.jobs, self.finish):
            if end is None:
                self.scheduler.cancel(job)  # a finished or failed job: nothing happens


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def _disconnected(request: HTTPRequest) -> None:
    """Returns when the client disconnects (after the body, uvicorn's receive() waits for just that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
