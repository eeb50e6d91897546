"""`kvtier proxy`: an OpenAI-compatible router for disaggregated prefill.

    kvtier proxy --prefill http://p0:8100 [--prefill URL ...] \\
                 --decode http://d0:8200 [--decode URL ...] --port 8000

For each `/v1/completions` or `/v1/chat/completions` request:

1. Prefill. A prefill instance (`kv_role: kv_producer`) gets a copy of the
   request with `max_tokens=1` (and `max_completion_tokens=1` when the
   client set it), `stream=false`, and vLLM's P/D marker
   `kv_transfer_params={"do_remote_decode": true}`. It computes the
   prompt's KV, keeps it pinned for the decode side, and answers with
   `kv_transfer_params` naming where the KV is (kvtier's connector puts its
   transport addresses, namespace and token count there).
2. Decode. The client's request, unchanged except for those
   `kv_transfer_params`, goes to a decode instance (`kv_role:
   kv_consumer`), which pulls the KV before its first step; its answer
   (streamed when the client asked for `stream=true`) goes back to the
   client as it arrives.

Failures: a prefill instance that cannot be reached or answers 5xx is not
fatal: the request goes to decode without `kv_transfer_params` and the
decode instance computes the prompt itself (counted in
`kvtier_proxy_prefill_failures_total`). A 4xx from prefill is the client's
error and goes back as it is. Errors from decode go back with their status;
a decode instance that cannot be reached is a 502.

Routing: `round_robin` (default) or `least_loaded` (fewest requests in
flight through this proxy, ties in round-robin order), per pool.

`/v1/models` is answered by a decode instance; `/health` is 200 when every
backend's `/health` answers 200 and 503 otherwise, with each backend's
status in the body; `/metrics` has the proxy's counters in Prometheus text.

FastAPI, httpx and uvicorn come with vLLM; the proxy needs nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)

logger = logging.getLogger("kvtier.proxy")

POLICIES = ("round_robin", "least_loaded")
# Request headers passed to the backends; everything else (host, length,
# encodings) is the proxy's own connection's business.
_FORWARDED_HEADERS = ("authorization", "x-request-id", "traceparent", "tracestate")
# Response headers kept on the way back.
_RETURNED_HEADERS = ("content-type", "x-request-id")


@dataclasses.dataclass
class Backend:
    url: str
    in_flight: int = 0
    requests: int = 0
    failures: int = 0


class Pool:
    """The instances of one role and the policy that picks among them."""

    def __init__(self, role: str, urls: Sequence[str], policy: str) -> None:
        if not urls:
            raise ValueError(f"at least one {role} instance is needed")
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; one of {', '.join(POLICIES)}")
        self.role = role
        self.backends = [Backend(url.rstrip("/")) for url in urls]
        self.policy = policy
        self._next = itertools.cycle(range(len(self.backends)))

    def pick(self) -> Backend:
        start = next(self._next)
        if self.policy == "round_robin":
            return self.backends[start]
        order = self.backends[start:] + self.backends[:start]
        return min(order, key=lambda b: b.in_flight)  # min keeps the first of equals


@dataclasses.dataclass
class Counters:
    requests: int = 0
    prefill_failures: int = 0
    prefill_client_errors: int = 0
    decode_failures: int = 0
    decode_errors: int = 0


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill instance's copy of a request: one token, not streamed,
    marked for a remote decode (vLLM's convention)."""
    out = dict(body)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out.pop("stream_options", None)
    out.pop("min_tokens", None)  # above max_tokens=1 vLLM refuses the request
    if "n" in out:
        out["n"] = 1
    out["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False}
    return out


def decode_body(body: dict[str, Any], kv_transfer_params: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(body)
    out.pop("kv_transfer_params", None)
    if kv_transfer_params:
        out["kv_transfer_params"] = kv_transfer_params
    return out


class Proxy:
    def __init__(
        self,
        prefill: Sequence[str],
        decode: Sequence[str],
        *,
        policy: str = "round_robin",
        timeout_s: float = 600.0,
        health_timeout_s: float = 5.0,
    ) -> None:
        self.prefill = Pool("prefill", prefill, policy)
        self.decode = Pool("decode", decode, policy)
        self.counters = Counters()
        self.timeout_s = timeout_s
        self.health_timeout_s = health_timeout_s
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
                # No pool limit: the backends' own queues decide how many run.
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), limits=limits)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------ requests

    async def run_prefill(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
        """kv_transfer_params from a prefill instance; None when it failed
        (decode recomputes); a (status, content, headers) triple for a 4xx,
        which is the client's own error."""
        backend = self.prefill.pick()
        backend.in_flight += 1
        backend.requests += 1
        try:
            resp = await self.client.post(backend.url + path, json=prefill_body(body), headers=headers)
        except httpx.HTTPError as exc:
            backend.failures += 1
            self.counters.prefill_failures += 1
            logger.warning("prefill %s failed (%s); decode computes the prompt", backend.url, exc)
            return None
        finally:
            backend.in_flight -= 1
        if 400 <= resp.status_code < 500:
            self.counters.prefill_client_errors += 1
            return resp.status_code, resp.content, _returned(resp.headers)
        if resp.status_code != 200:
            backend.failures += 1
            self.counters.prefill_failures += 1
            logger.warning("prefill %s answered %d; decode computes the prompt", backend.url, resp.status_code)
            return None
        try:
            params = resp.json().get("kv_transfer_params")
        except (ValueError, AttributeError):
            params = None
        if not isinstance(params, dict) or not params:
            # A prefill instance without a producer connector: nothing to pull.
            self.counters.prefill_failures += 1
            logger.warning("prefill %s returned no kv_transfer_params; decode computes the prompt", backend.url)
            return None
        return params

    async def handle(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
        self.counters.requests += 1
        prefilled = await self.run_prefill(path, body, headers)
        if isinstance(prefilled, tuple):
            status, content, returned = prefilled
            return Response(content=content, status_code=status, headers=returned)
        out = decode_body(body, prefilled)
        backend = self.decode.pick()
        backend.in_flight += 1
        backend.requests += 1
        request = self.client.build_request("POST", backend.url + path, json=out, headers=headers)
        try:
            resp = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            backend.in_flight -= 1
            backend.failures += 1
            self.counters.decode_failures += 1
            logger.warning("decode %s failed: %s", backend.url, exc)
            return JSONResponse(
                status_code=502,
                content={"error": {"message": f"decode instance {backend.url} unreachable: {exc}",
                                   "type": "BadGateway", "code": 502}},
            )
        if resp.status_code != 200 or not body.get("stream"):
            try:
                content = await resp.aread()
            finally:
                await resp.aclose()
                backend.in_flight -= 1
            if resp.status_code != 200:
                self.counters.decode_errors += 1
            return Response(content=content, status_code=resp.status_code, headers=_returned(resp.headers))

        async def passthrough() -> AsyncIterator[bytes]:
            try:
                async for piece in resp.aiter_raw():
                    yield piece
            except httpx.HTTPError as exc:
                # The client already has a 200 and part of the stream: all
                # that is left is to end it.
                self.counters.decode_failures += 1
                logger.warning("decode %s broke off a stream: %s", backend.url, exc)
            finally:
                await resp.aclose()
                backend.in_flight -= 1

        return StreamingResponse(passthrough(), status_code=200, headers=_returned(resp.headers))

    async def models(self, headers: dict[str, str]) -> Any:
        backend = self.decode.pick()
        try:
            resp = await self.client.get(backend.url + "/v1/models", headers=headers)
        except httpx.HTTPError as exc:
            return JSONResponse(status_code=502, content={"error": {"message": str(exc), "code": 502}})
        return Response(content=resp.content, status_code=resp.status_code, headers=_returned(resp.headers))

    async def health(self) -> tuple[bool, dict[str, Any]]:
        async def probe(url: str) -> str:
            try:
                resp = await self.client.get(url + "/health", timeout=self.health_timeout_s)
            except httpx.HTTPError as exc:
                return f"unreachable: {type(exc).__name__}"
            return "ok" if resp.status_code == 200 else f"status {resp.status_code}"

        pools = (self.prefill, self.decode)
        backends = [(pool.role, b.url) for pool in pools for b in pool.backends]
        results = await asyncio.gather(*(probe(url) for _, url in backends))
        body: dict[str, Any] = {pool.role: {} for pool in pools}
        for (role, url), status in zip(backends, results, strict=True):
            body[role][url] = status
        ok = all(status == "ok" for status in results)
        body["status"] = "ok" if ok else "degraded"
        return ok, body

    def metrics_text(self) -> str:
        lines = []
        for field in dataclasses.fields(Counters):
            name = f"kvtier_proxy_{field.name}_total"
            lines += [f"# TYPE {name} counter", f"{name} {getattr(self.counters, field.name)}"]
        for kind in ("in_flight", "requests", "failures"):
            name = f"kvtier_proxy_backend_{kind}"
            lines.append(f"# TYPE {name} gauge")
            for pool in (self.prefill, self.decode):
                for b in pool.backends:
                    lines.append(f'{name}{{role="{pool.role}",url="{b.url}"}} {getattr(b, kind)}')
        return "\n".join(lines) + "\n"


def _returned(headers: Any) -> dict[str, str]:
    return {k: headers[k] for k in _RETURNED_HEADERS if k in headers}


def build_app(proxy: Proxy) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await proxy.close()

    app = FastAPI(title="kvtier proxy", lifespan=lifespan)

    def forwarded(request: Request) -> dict[str, str]:
        return {k: request.headers[k] for k in _FORWARDED_HEADERS if k in request.headers}

    async def route(path: str, request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse(status_code=400, content={"error": {"message": "the body must be a JSON object", "code": 400}})
        return await proxy.handle(path, body, forwarded(request))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await route("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await route("/v1/chat/completions", request)

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        return await proxy.models(forwarded(request))

    @app.get("/health")
    async def health() -> Any:
        ok, body = await proxy.health()
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @app.get("/metrics")
    async def metrics() -> Any:
        return PlainTextResponse(proxy.metrics_text())

    return app


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", action="append", required=True, metavar="URL",
                   help="a prefill (kv_producer) instance's base URL; repeat for several")
    p.add_argument("--decode", action="append", required=True, metavar="URL",
                   help="a decode (kv_consumer) instance's base URL; repeat for several")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="port to listen on")
    p.add_argument("--policy", choices=POLICIES, default="round_robin",
                   help="how an instance is picked in each pool (default round_robin)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="per backend request (default 600)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def run(args: argparse.Namespace) -> int:
    try:
        proxy = Proxy(args.prefill, args.decode, policy=args.policy, timeout_s=args.timeout)
    except ValueError as exc:
        print(f"kvtier proxy: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(build_app(proxy), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvtier proxy", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
