"""The ingress: an OpenAI-compatible FastAPI app served by Ray Serve in front of the engine replicas, or holding
the engine itself when colocated (engine_client.py).

It authenticates, validates, tokenizes (chat templates included), enforces limits, and turns the replicas'
token streams into OpenAI responses or server-sent events. Every client mistake is a 4xx in OpenAI's error
shape; a client that goes away mid-stream cancels its generation, which frees its KV on the replica.
"""


import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from moe_serve.cache import PromptCache, PromptCacheConfig
from moe_serve.model.tokenizer import Tokenizer
from moe_serve.replicas.engine_client import EngineClient, LocalEngine, RemoteEngine, TokenChunks
from moe_serve.replicas.engine_replica import EngineReplica
from moe_serve.replicas.logprobs import chat_logprobs, completion_logprobs, token_text
from moe_serve.replicas.metrics import ServingMetrics
from moe_serve.replicas.protocol import (
    APIError,
    ChatChoice,
    ChatChoiceMessage,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingFields,
    Usage,
)
from moe_serve.replicas.settings import AppSettings
from moe_serve.replicas.token_stream import Resume, TokenStream, collect_all, merged

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions

app = FastAPI(title="moe-serve", description="OpenAI-compatible API for Mixture-of-Experts models")


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body.model_dump(), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        error = APIError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
    else:
        location = ".".join(str(part) for part in first.get("loc", ())[1:])
        error = APIError(422, f"{location}: {first.get('msg', 'invalid value')}", param=location or None)
    return JSONResponse(error.body.model_dump(), status_code=error.status)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _utf8(text: str, param: str) -> str:
    """JSON can carry lone surrogates that are not text; refuse them before the tokenizer sees them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param} is not valid Unicode text ({exc.reason})", param=param) from None
    return text


REPLICA_HEADER = "x-moe-replica"  # which engine replica served the request (prefix affinity, debugging)


def _json(response: Any, replica: str) -> JSONResponse:
    return JSONResponse(response.model_dump(), headers={REPLICA_HEADER: replica})


def _sse(events: AsyncIterator[str], streams: list[TokenStream]) -> StreamingResponse:
    async def with_done() -> AsyncIterator[str]:
        async for event in events:
            yield event
        error = next((s.error for s in streams if s.error is not None), None)
        if error is None:
            yield "data: [DONE]\n\n"
        else:  # no [DONE]: the client must not take a broken stream for a finished one
            yield _event(APIError(503, error).body.model_dump())

    return StreamingResponse(with_done(), media_type="text/event-stream",
                             headers={REPLICA_HEADER: streams[0].replica})


def _replica_count(deployment_name: str) -> int:
    """Running replicas holding an engine: `deployment_name`'s."""
    try:
        status = serve.status()
        return sum(
            deployment.replica_states.get("RUNNING", 0)
            for application in status.applications.values()
            for name, deployment in application.deployments.items()
            if name == deployment_name
        )
    except Exception:  # status is best-effort for metrics; the controller may be busy
        return 0


@app.middleware("http")
async def _limit_body_size(request: Request, call_next: Any) -> Any:
    limit = getattr(request.app.state, "max_body_bytes", None)
    if limit is not None and request.method == "POST":
        declared = request.headers.get("content-length")
        size = int(declared) if declared and declared.isdigit() else len(await request.body())
        if size > limit:
            error = APIError(413, f"request body of {size} bytes exceeds the limit of {limit}")
            return JSONResponse(error.body.model_dump(), status_code=413)
    return await call_next(request)


@app.middleware("http")
async def _count_responses(request: Request, call_next: Any) -> Any:
    """moe_http_requests_total by route template (not the raw path: unknown paths would make a series each); a request
    cancelled before its response started (the client left) is not counted."""
    try:
        response = await call_next(request)
    except Exception:  # unhandled: the server answers 500
        _count_response(request, 500)
        raise
    _count_response(request, response.status_code)
    return response


def _count_response(request: Request, status: int) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.http.labels(route=route, status_code=str(status)).inc()


# Defined last: serve.ingress snapshots the module when it wraps the class, so helpers must exist before it.
@serve.ingress(app)
class Ingress:
    async def __init__(  # type: ignore[misc]
        self, engine: DeploymentHandle | None, settings: AppSettings, experts: DeploymentHandle | None = None
    ) -> None:
        """`engine`: the `EngineReplica` deployment; None: colocated, this replica builds and holds the engine.

        Async (Serve awaits it) so a colocated engine can await the experts' router, as EngineReplica does."""
        app.state.max_body_bytes = settings.limits.max_body_bytes
        self.local_engine: EngineReplica | None = None
        if engine is None:
            self.local_engine = EngineReplica.__new__(EngineReplica)
            await self.local_engine.__init__(settings, experts)  # type: ignore[misc]
        self.engine: EngineClient = RemoteEngine(engine) if engine is not None else LocalEngine(self.local_engine)
        self.engine_deployment = "Ingress" if engine is None else "EngineReplica"
        self.experts = experts  # the ExpertShards deployment when experts run on shard actors
        self.settings = settings
        self.api_key = settings.resolved_api_key()
        self.tokenizer = Tokenizer.from_dir(settings.model_dir)
        self.token_text = token_text(self.tokenizer)  # names tokens in logprobs
        # text -> ids cache shared by every ingress through Redis: a repeated long prompt is tokenized once
        cache = settings.cache_config()
        self.prompt_cache = None if self.tokenizer is None else PromptCache(
            self.tokenizer.fingerprint, PromptCacheConfig(warm_url=cache.warm_url if cache else None))
        self.metrics = ServingMetrics()
        app.state.metrics = self.metrics
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._max_model_len: int | None = None

    # --- Serve hooks and handle calls; with a colocated engine, its replica's ----------------------------------

    def stats(self) -> dict[str, float]:
        """The colocated engine's load (`moe-serve status`); only when colocated."""
        return self._colocated_engine().stats()

    def cache_stats(self) -> dict[str, Any] | None:
        """The colocated engine's prefix-cache counters (`moe-serve status`); only when colocated."""
        return self._colocated_engine().cache_stats()

    def _colocated_engine(self) -> EngineReplica:
        if self.local_engine is None:
            raise RuntimeError("the engine runs in the EngineReplica deployment: ask it")
        return self.local_engine

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The colocated engine's load for the autoscaler (Serve asks only deployments that autoscale)."""
        return self.local_engine.record_autoscaling_stats() if self.local_engine is not None else {}

    def check_health(self) -> None:
        if self.local_engine is not None:
            self.local_engine.check_health()

    def __del__(self) -> None:
        """Serve calls this on scale-down: a colocated engine drains as an EngineReplica does."""
        local = getattr(self, "local_engine", None)
        if local is not None:
            local.__del__()

    # --- routes --------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        stats = await self.engine.stats()
        return JSONResponse({"status": "ok" if stats["healthy"] else "unhealthy", "model": self.settings.served_name},
                            status_code=200 if stats["healthy"] else 503)

    @app.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        self.metrics.observe_replica(await self.engine.stats(), _replica_count(self.engine_deployment))
        self.metrics.observe_process(self.replica_id, "Ingress", time.process_time())
        cache = await self.engine.cache_metrics()  # one replica's tiered-cache counters
        experts = await self.experts.metrics_text.remote() if self.experts is not None else b""  # per-expert load
        prompts = self.prompt_cache.stats.prometheus_text(prefix="moe_prompt_cache") if self.prompt_cache else b""
        return PlainTextResponse(self.metrics.render() + cache + experts + prompts,
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(self, request: Request) -> ModelList:
        self._authorize(request)
        return ModelList(data=[ModelCard(id=self.settings.served_name)])

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        self._authorize(request)
        self._check_common(body)
        prompt_ids = await self._completion_prompt(body)
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        prompt_logprobs = body.logprobs if body.echo else None  # an echoed prompt is scored too
        streams = await self._start(prompt_ids, body, max_tokens, body.logprobs, prompt_logprobs)
        echo = self.tokenizer.decode(prompt_ids) if body.echo and self.tokenizer else ""
        if body.stream:
            return _sse(self._completion_chunks(body, streams, prompt_ids, echo), streams)
        choices = []
        for index, (stream, out) in enumerate(zip(streams, await collect_all(streams), strict=True)):
            logprobs = None
            if body.logprobs is not None:
                echoed = prompt_ids if stream.prompt_logprobs is not None else []
                logprobs = completion_logprobs([*echoed, *out.token_ids],
                                               [*(stream.prompt_logprobs or []), *out.logprobs],
                                               self.token_text, body.logprobs > 0, 0)
            choices.append(CompletionChoice(index=index, text=echo + out.text, finish_reason=out.finish_reason,
                                            logprobs=logprobs))
        usage = _usage(len(prompt_ids), sum(s.tokens for s in streams), streams[0].cached_tokens)
        return _json(CompletionResponse(model=body.model, usage=usage, choices=choices), streams[0].replica)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        self._authorize(request)
        self._check_common(body)
        if self.tokenizer is None or not self.tokenizer.has_chat_template:
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        try:
            messages = [{"role": m.role, "content": _utf8(m.content, "messages")} for m in body.messages]
            text = self.tokenizer.apply_chat_template(messages)
            prompt_ids = await self._encode(text, add_special_tokens=False)  # the template has them
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        self._check_prompt_length(prompt_ids)
        max_len = await self._model_len()
        max_tokens = body.max_tokens or max(1, min(self.settings.limits.max_tokens, max_len - len(prompt_ids)))
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        streams = await self._start(prompt_ids, body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
        if body.stream:
            return _sse(self._chat_chunks(body, streams, len(prompt_ids)), streams)
        choices = [
            ChatChoice(index=index, message=ChatChoiceMessage(content=out.text), finish_reason=out.finish_reason,
                       logprobs=chat_logprobs(out.token_ids, out.logprobs, self.token_text) if body.logprobs else None)
            for index, out in enumerate(await collect_all(streams))
        ]
        usage = _usage(len(prompt_ids), sum(s.tokens for s in streams), streams[0].cached_tokens)
        return _json(ChatCompletionResponse(model=body.model, usage=usage, choices=choices), streams[0].replica)

    # --- checks --------------------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    def _check_common(self, body: SamplingFields) -> None:
        limits = self.settings.limits
        if body.model != self.settings.served_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves "
                                f"{self.settings.served_name!r}", param="model", code="model_not_found")
        if body.n > limits.max_n:
            raise APIError(400, f"n={body.n}: at most {limits.max_n} completions per request", param="n")
        if body.max_tokens is not None and body.max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens={body.max_tokens} exceeds the limit of {limits.max_tokens}",
                           param="max_tokens")

    async def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        assert self.tokenizer is not None and self.prompt_cache is not None
        tokenizer = self.tokenizer
        return await self.prompt_cache.aencode(
            text, lambda t: tokenizer.encode(t, add_special_tokens=add_special_tokens),
            variant=f"special={int(add_special_tokens)}",
        )

    async def _completion_prompt(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts are not supported: send one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt is empty", param="prompt")
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send token ids as the prompt", param="prompt")
            prompt_ids = await self._encode(_utf8(prompt, "prompt"), add_special_tokens=True)
        else:
            prompt_ids = list(prompt)
        self._check_prompt_length(prompt_ids)
        return prompt_ids

    def _check_prompt_length(self, prompt_ids: list[int]) -> None:
        if len(prompt_ids) > self.settings.limits.max_prompt_tokens:
            raise APIError(400, f"prompt has {len(prompt_ids)} tokens, the limit is "
                                f"{self.settings.limits.max_prompt_tokens}", param="prompt")

    async def _model_len(self) -> int:
        if self._max_model_len is None:
            self._max_model_len = await self.engine.max_model_len()
        return self._max_model_len

    # --- streaming -----------------------------------------------------------------------------------------

    async def _start(self, prompt_ids: list[int], body: SamplingFields, max_tokens: int,
                     logprobs: int | None = None, prompt_logprobs: int | None = None) -> list[TokenStream]:
        """One engine generation per choice (`n`); choice i of a seeded request uses seed + i."""
        if body.stop and self.tokenizer is None:
            raise APIError(400, "stop strings need a tokenizer; this model has none", param="stop")
        sampling = dict(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                        stop=tuple(_utf8(s, "stop") for s in body.stop or ()),
                        min_tokens=min(body.min_tokens, max_tokens), ignore_eos=body.ignore_eos, logprobs=logprobs,
                        prompt_logprobs=prompt_logprobs)
        # a non-streamed response needs no intermediate chunks: the rest comes in one message at the end
        interval_s = self.settings.stream_interval_ms / 1000 if body.stream else None
        streams = []
        for index in range(body.n):
            choice = {**sampling, "seed": None if body.seed is None else body.seed + index}
            generator = self.engine.generate(prompt_ids, choice, interval_s)
            resume = None if self.local_engine is not None else self._resumer(prompt_ids, choice, interval_s)
            streams.append(TokenStream(generator, self.metrics, resume))
        firsts = await asyncio.gather(*(s.first() for s in streams), return_exceptions=True)
        failed = next((f for f in firsts if isinstance(f, BaseException)), None)
        if failed is not None:  # errors become 4xx here, before any response byte is sent
            for stream in streams:
                stream.generator.cancel()
            raise failed
        return streams

    def _resumer(self, prompt_ids: list[int], sampling: dict[str, Any], interval_s: float | None) -> Resume:
        """How a choice's request is sent again after its replica died: the produced ids join the prompt, the budget
        shrinks by them, and the new replica's random stream and text continue theirs (SamplingParams.resumed_tokens).
        Unseeded sampling draws fresh numbers either way."""

        def resume(produced: list[int]) -> TokenChunks | None:
            done = len(produced)
            if done >= sampling["max_tokens"]:
                return None
            rest = {**sampling, "max_tokens": sampling["max_tokens"] - done, "resumed_tokens": done,
                    "min_tokens": max(0, sampling["min_tokens"] - done)}
            if done:
                rest["prompt_logprobs"] = None  # sent with the first chunk already
            return self.engine.generate(prompt_ids + produced, rest, interval_s)

        return resume

    async def _completion_chunks(
        self, body: CompletionRequest, streams: list[TokenStream], prompt_ids: list[int], echo: str
    ) -> AsyncIterator[str]:
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        offsets = [0] * len(streams)  # per choice: where the next token's text starts

        def event(index: int, text: str, logprobs: CompletionLogprobs | None, finish_reason: str | None) -> str:
            if logprobs is not None:
                offsets[index] += sum(len(t) for t in logprobs.tokens)
            choice = {"index": index, "text": text, "finish_reason": finish_reason,
                      "logprobs": None if logprobs is None else logprobs.model_dump()}
            return _event({"id": response_id, "object": "text_completion", "created": created, "model": body.model,
                           "choices": [choice]})

        for index, stream in enumerate(streams):
            if echo or stream.prompt_logprobs is not None:
                logprobs = None
                if body.logprobs is not None and stream.prompt_logprobs is not None:
                    logprobs = completion_logprobs(prompt_ids, stream.prompt_logprobs, self.token_text,
                                                   body.logprobs > 0, 0)
                yield event(index, echo, logprobs, None)
        async for index, item in merged(streams):
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(item["token_ids"], item["logprobs"], self.token_text,
                                               body.logprobs > 0, offsets[index])
            yield event(index, item["text"], logprobs, item["finish_reason"] if item["finished"] else None)
        if body.stream_options and body.stream_options.include_usage:
            usage = _usage(len(prompt_ids), sum(s.tokens for s in streams), streams[0].cached_tokens).model_dump()
            yield _event({"id": response_id, "object": "text_completion", "created": created, "model": body.model,
                          "choices": [], "usage": usage})

    async def _chat_chunks(
        self, body: ChatCompletionRequest, streams: list[TokenStream], prompt_tokens: int
    ) -> AsyncIterator[str]:
        chunk = ChatCompletionChunk(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                                    choices=[])
        for index in range(len(streams)):
            role = ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
            yield _event(chunk.model_copy(update={"choices": [role]}).model_dump(exclude_none=True))
        async for index, item in merged(streams):
            logprobs = chat_logprobs(item["token_ids"], item["logprobs"], self.token_text) if body.logprobs else None
            choice = ChatChunkChoice(index=index, delta=ChatDelta(content=item["text"]), logprobs=logprobs,
                                     finish_reason=item["finish_reason"] if item["finished"] else None)
            yield _event(chunk.model_copy(update={"choices": [choice]}).model_dump(exclude_none=True))
        if body.stream_options and body.stream_options.include_usage:
            usage = _usage(prompt_tokens, sum(s.tokens for s in streams), streams[0].cached_tokens)
            yield _event(chunk.model_copy(update={"choices": [], "usage": usage}).model_dump(exclude_none=True))
