"""The controller's FastAPI application over one engine (one rank).

Every endpoint is a plain ``def``: FastAPI runs it on its worker threads,
never on the event loop, so a long engine call (a verify, a clear of a
large disk tier, a profile) does not stall the other endpoints, and the
engine's forward-path threads never wait for the controller (the native
calls release the GIL).

Errors: a malformed body is a 422 before the engine is called; an engine
refusal maps by kind (InvalidArgument 400, NotFound 404, FailedPrecondition
409, Unavailable / ResourceExhausted 503, NotImplementedByBuild 501).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials

from kvtier._version import __version__
from kvtier.controller import models
from kvtier.controller.auth import bearer, require_token, token_matches
from kvtier.controller.tasks import TaskRegistry

# (text, add_special_tokens) -> token ids, with the served model's tokenizer.
Tokenizer = Callable[[str, bool], list[int]]

MAX_PROFILE_S = 600.0

_STATUS_BY_ERROR = (
    ("NotFoundError", 404),
    ("InvalidArgumentError", 400),
    ("FailedPreconditionError", 409),
    ("AlreadyExistsError", 409),
    ("UnavailableError", 503),
    ("ResourceExhaustedError", 503),
    ("NotImplementedByBuildError", 501),
)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": models.ErrorResponse, "description": what}
    for code, what in ((400, "Bad input"), (401, "Missing or wrong bearer token"), (501, "Not in this engine build"))
}


def _fail(exc: BaseException) -> NoReturn:
    names = {cls.__name__ for cls in type(exc).__mro__}
    for name, status in _STATUS_BY_ERROR:
        if name in names:
            raise HTTPException(status, f"{type(exc).__name__}: {exc}") from exc
    if isinstance(exc, (ValueError, TypeError)):  # the Python wrapper's argument checks
        raise HTTPException(400, f"{type(exc).__name__}: {exc}") from exc
    raise exc


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - _fail maps the engine's errors, re-raises the rest
        _fail(exc)


def create_app(
    engine: Any,
    *,
    rank: int = 0,
    token: str = "",
    tokenizer: Tokenizer | None = None,
    tasks: TaskRegistry | None = None,
) -> FastAPI:
    """The API over ``engine`` (a kvtier.Engine). ``token``: required as a
    bearer token by every endpoint but /health when not empty.
    ``tokenizer`` turns request text into token ids (None: text is a 400)."""
    auth = Depends(require_token(token))
    app = FastAPI(
        title="kvtier controller",
        version=__version__,
        description="Inspect and operate one kvtier engine (one rank). See docs/controller.md.",
        openapi_url=None,  # served below, behind the token
        docs_url=None,
        redoc_url=None,
        responses=_ERRORS,
    )
    from kvtier.metrics import VerifyResults

    registry = tasks or TaskRegistry()
    profile_lock = threading.Lock()
    metrics_registry: Any = None
    metrics_lock = threading.Lock()
    # The last /v1/verify, exported on /metrics as the index-consistency SLI.
    verified = VerifyResults()

    def prefix(req: models._PrefixFields) -> tuple[list[int], Any]:
        if req.tokens is not None:
            tokens = list(req.tokens)
        else:
            if tokenizer is None:
                raise HTTPException(400, "text needs the served model's tokenizer, which this controller has not got: send tokens")
            assert req.text is not None
            try:
                tokens = [int(t) for t in tokenizer(req.text, req.add_special_tokens)]
            except Exception as exc:  # the tokenizer's own error is the caller's input problem
                raise HTTPException(400, f"the tokenizer refused the text: {type(exc).__name__}: {exc}") from exc
            if not tokens:
                raise HTTPException(400, "the text tokenizes to no tokens")
        extras = None
        if req.cache_salt is not None:
            from kvtier.engine import KeyExtras

            # The salt KVTierConnector (request_key_extras) gives a request
            # whose only identity beyond its tokens is cache_salt.
            extras = KeyExtras(salt=json.dumps([["cache_salt", req.cache_salt]], separators=(",", ":")))
        return tokens, extras

    @app.get("/openapi.json", include_in_schema=False, dependencies=[auth])
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get(
        "/health",
        response_model=models.HealthResponse,
        responses={503: {"model": models.HealthResponse, "description": "The engine is down"}},
        summary="ok / degraded / down, with reasons (200, or 503 when down); no token needed",
    )
    def health(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Any:
        report = _health(engine)
        body = models.HealthResponse(rank=rank, **report)
        if not token_matches(credentials, token):
            body = models.HealthResponse(rank=rank, status=body.status, reasons=[], tiers={}, queues={}, detail_hidden=True)
        return JSONResponse(body.model_dump(), status_code=503 if body.status == "down" else 200)

    @app.get(
        "/metrics",
        dependencies=[auth],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition"}},
        summary="kvtier_* metrics of this engine (Prometheus text format)",
    )
    def metrics() -> Response:
        nonlocal metrics_registry
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from kvtier.metrics import engine_registry

        with metrics_lock:
            if metrics_registry is None:
                metrics_registry = engine_registry({rank: engine}, verified)
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/stats", dependencies=[auth], response_model=models.StatsResponse,
             summary="Engine.stats(): every counter and gauge, per tier")
    def stats() -> Any:
        return models.StatsResponse(rank=rank, stats=_call(engine.stats))

    @app.post("/v1/lookup", dependencies=[auth], response_model=models.LookupResponse,
              summary="How much of a prefix is cached, and in which tier")
    def lookup(req: models.LookupRequest) -> Any:
        tokens, extras = prefix(req)
        found = _call(engine.lookup_tiers, tokens, extras=extras)
        return models.LookupResponse(
            rank=rank,
            query_tokens=len(tokens),
            cached_tokens=int(found["tokens"]),
            chunk_tokens=int(found["chunk_tokens"]),
            chunks=found["chunks"],
            by_tier=found["by_tier"],
        )

    @app.post("/v1/clear", dependencies=[auth], response_model=models.ClearResponse,
              summary="Remove entries: by tier, by prefix, older than; or all")
    def clear(req: models.ClearRequest) -> Any:
        tokens, extras = prefix(req) if (req.tokens is not None or req.text is not None) else (None, None)
        # all: true is every argument None: every unpinned chunk of every tier.
        cleared = _call(engine.clear, tiers=req.tiers, tokens=tokens, extras=extras, older_than_s=req.older_than_s)
        return models.ClearResponse(rank=rank, cleared=int(cleared))

    @app.post("/v1/pin", dependencies=[auth], response_model=models.PinResponse,
              summary="Pin the cached chunks of a prefix (never evicted), optionally for ttl_s")
    def pin(req: models.PinRequest) -> Any:
        tokens, extras = prefix(req)
        ttl_s = None if req.ttl_s is None else float(req.ttl_s)
        return models.PinResponse(rank=rank, pinned=int(_call(engine.pin, tokens, extras=extras, ttl_s=ttl_s)))

    @app.post("/v1/unpin", dependencies=[auth], response_model=models.UnpinResponse,
              summary="Unpin the chunks of a prefix")
    def unpin(req: models.UnpinRequest) -> Any:
        tokens, extras = prefix(req)
        return models.UnpinResponse(rank=rank, unpinned=int(_call(engine.unpin, tokens, extras=extras)))

    @app.post("/v1/move", dependencies=[auth], response_model=models.MoveResponse, status_code=202,
              summary="Move the cached prefix to a tier in the background; returns a task id")
    def move(req: models.MoveRequest) -> Any:
        tokens, extras = prefix(req)
        task = _call(engine.move, tokens, req.tier, extras=extras)
        return models.MoveResponse(rank=rank, task_id=registry.add("move", task))

    @app.get("/v1/tasks/{task_id}", dependencies=[auth], response_model=models.TaskResponse,
             responses={404: {"model": models.ErrorResponse, "description": "No such task"}},
             summary="A task's state, and its result once done")
    def task(task_id: str) -> Any:
        entry = registry.get(task_id)
        if entry is None:
            raise HTTPException(404, f"no task {task_id!r} (unknown, or finished and forgotten)")
        return models.TaskResponse(**entry.report())

    @app.get("/v1/async", dependencies=[auth], response_model=models.AsyncResponse,
             summary="Queue depths and the tasks in flight")
    def async_work() -> Any:
        entries = registry.entries()
        running = [models.TaskResponse(**e.report()) for e in entries if not e.task.done()]
        return models.AsyncResponse(rank=rank, queues=_queues(engine), tasks_running=running, tasks_kept=len(entries))

    @app.post("/v1/verify", dependencies=[auth], response_model=models.VerifyResponse,
              summary="Index against tier contents: the index-consistency SLI, with counts")
    def verify(req: models.VerifyRequest | None = None) -> Any:
        deep = req.deep if req is not None else False
        report = _call(engine.verify, deep=deep)
        verified.record(rank, report)
        return models.VerifyResponse(rank=rank, **report)

    @app.get(
        "/v1/profile",
        dependencies=[auth],
        responses={200: {"content": {"application/json": {}}, "description": "A speedscope file"},
                   409: {"model": models.ErrorResponse, "description": "A profile is already running"}},
        summary="Sample this process's threads for duration_s; returns a speedscope profile",
    )
    def profile(
        duration_s: float = Query(10.0, gt=0, le=MAX_PROFILE_S, description="Seconds to sample."),
        interval_ms: float = Query(10.0, ge=1, le=1000, description="Milliseconds between samples."),
    ) -> Any:
        from kvtier.controller import profiler

        if not profile_lock.acquire(blocking=False):
            raise HTTPException(409, "a profile is already running in this process")
        try:
            doc = profiler.sample(duration_s, interval_ms / 1000.0, name=f"kvtier rank {rank}")
        finally:
            profile_lock.release()
        return JSONResponse(doc)

    return app


def _queues(engine: Any) -> dict[str, Any]:
    """Engine.health()'s queues (write-behind, remote uploads, store copies:
    depth and capacity) and the drop counters from stats()."""
    queues = dict(_call(engine.health).get("queues", {}))
    stats = _call(engine.stats)
    queues["write_behind_dropped"] = stats.get("write_behind_dropped", 0)
    remote = stats.get("remote")
    if isinstance(remote, dict):
        queues["remote_upload_dropped"] = remote.get("upload_dropped", 0)
    return queues


def _health(engine: Any) -> dict[str, Any]:
    """The engine's own report; an engine that does not answer is down."""
    try:
        report = dict(engine.health())
    except Exception as exc:  # noqa: BLE001 - whatever stops the engine answering means down
        return {"status": "down", "reasons": [f"{type(exc).__name__}: {exc}"], "tiers": {}, "queues": {}}
    return {"status": report["status"], "reasons": list(report.get("reasons", [])),
            "tiers": dict(report.get("tiers", {})), "queues": dict(report.get("queues", {}))}
