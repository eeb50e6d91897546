"""`kvtier proxy` (the disaggregated-prefill router) as a real process,
in front of small real HTTP servers that play vLLM's side of the contract:
they record what they receive and answer as a prefill instance (with
`kv_transfer_params`) or a decode instance (JSON or a server-sent-event
stream). What a real `vllm serve` does with the requests is
tests/e2e/test_vllm_pd.py's business.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Backend:
    """A recording HTTP server answering like a vLLM instance of `role`."""

    def __init__(self, role: str, *, status: int = 200) -> None:
        self.role = role
        self.status = status
        self.received: list[tuple[str, dict[str, Any]]] = []
        # "hold_prefill": true in a body makes the prefill answer wait for
        # `release`; "hold_stream": true the decode stream's second event.
        self.release = threading.Event()
        self.holding = threading.Event()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(backend.status, {})
                elif self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": f"model-of-{backend.role}"}]})
                else:
                    self._send(404, {})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                backend.received.append((self.path, body))
                if backend.status != 200:
                    self._send(backend.status, {"error": {"message": f"{backend.role} says no", "code": backend.status}})
                    return
                if backend.role == "prefill":
                    if body.get("hold_prefill"):
                        backend.holding.set()
                        backend.release.wait(30)
                    n = len(backend.received)
                    self._send(200, {"choices": [{"text": "x"}], "kv_transfer_params": {"kvtier": {"n": n}}})
                    return
                params = body.get("kv_transfer_params")
                if not body.get("stream"):
                    self._send(200, {"choices": [{"text": "decoded"}], "seen_params": params})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                events = [{"choices": [{"text": f"t{i}"}]} for i in range(3)]
                for i, event in enumerate(events):
                    if i == 1 and body.get("hold_stream"):
                        backend.release.wait(30)
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    started: list[Backend] = []
    yield started
    for b in started:
        b.close()


def backend(backends: list[Backend], role: str, **kwargs: Any) -> Backend:
    b = Backend(role, **kwargs)
    backends.append(b)
    return b


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.fixture
def start_proxy() -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(prefill: list[str], decode: list[str], policy: str = "round_robin") -> str:
        port = free_port()
        args = [sys.executable, "-m", "kvtier.cli", "proxy", "--port", str(port), "--policy", policy,
                "--log-level", "warning"]
        args += [a for url in prefill for a in ("--prefill", url)]
        args += [a for url in decode for a in ("--decode", url)]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # start-up: until the proxy's own /metrics answers
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                httpx.get(url + "/metrics", timeout=2)
                return url
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "kvtier proxy did not start"
                time.sleep(0.1)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(30)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_completion_is_prefilled_then_decoded_with_the_params(backends: list[Backend], start_proxy: Any) -> None:
    p, d = backend(backends, "prefill"), backend(backends, "decode")
    url = start_proxy([p.url], [d.url])
    request = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 7, "min_tokens": 2, "temperature": 0,
               "stream_options": {"include_usage": True}}
    r = httpx.post(url + "/v1/completions", json=request, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["seen_params"] == {"kvtier": {"n": 1}}

    [(path, sent)] = p.received
    assert path == "/v1/completions"
    assert sent["max_tokens"] == 1 and sent["stream"] is False
    assert "min_tokens" not in sent and "stream_options" not in sent and "max_completion_tokens" not in sent
    assert sent["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False}
    assert sent["prompt"] == [1, 2, 3]
    [(path, sent)] = d.received
    assert path == "/v1/completions"
    assert sent == {**request, "kv_transfer_params": {"kvtier": {"n": 1}}}


def test_chat_caps_max_completion_tokens(backends: list[Backend], start_proxy: Any) -> None:
    p, d = backend(backends, "prefill"), backend(backends, "decode")
    url = start_proxy([p.url], [d.url])
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9}
    r = httpx.post(url + "/v1/chat/completions", json=request, timeout=30)
    assert r.status_code == 200, r.text
    assert p.received[0][0] == "/v1/chat/completions"
    assert p.received[0][1]["max_completion_tokens"] == 1 and p.received[0][1]["max_tokens"] == 1
    assert d.received[0] == ("/v1/chat/completions", {**request, "kv_transfer_params": {"kvtier": {"n": 1}}})


def test_stream_is_passed_through_as_it_arrives(backends: list[Backend], start_proxy: Any) -> None:
    p, d = backend(backends, "prefill"), backend(backends, "decode")
    url = start_proxy([p.url], [d.url])
    request = {"model": "m", "prompt": "abc", "max_tokens": 3, "stream": True, "hold_stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=request, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        # The decode instance sends its second event only after `release`:
        # a proxy that buffered the stream would time out here.
        first = next(line for line in lines if line)
        assert json.loads(first.removeprefix("data: "))["choices"][0]["text"] == "t0"
        d.release.set()
        rest = [line for line in lines if line]
    assert [json.loads(x.removeprefix("data: "))["choices"][0]["text"] for x in rest[:-1]] == ["t1", "t2"]
    assert rest[-1] == "data: [DONE]"
    assert p.received[0][1]["stream"] is False
    assert d.received[0][1]["stream"] is True


def test_dead_prefill_sends_to_decode_without_params(backends: list[Backend], start_proxy: Any) -> None:
    d = backend(backends, "decode")
    url = start_proxy([dead_url()], [d.url])
    r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "abc", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["seen_params"] is None
    assert "kv_transfer_params" not in d.received[0][1]
    assert metric(url, "kvtier_proxy_prefill_failures_total") == 1


def test_prefill_5xx_is_recomputed_4xx_is_returned(backends: list[Backend], start_proxy: Any) -> None:
    p, d = backend(backends, "prefill", status=500), backend(backends, "decode")
    url = start_proxy([p.url], [d.url])
    r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "abc"}, timeout=30)
    assert r.status_code == 200 and r.json()["seen_params"] is None
    assert metric(url, "kvtier_proxy_prefill_failures_total") == 1
    p.status = 400
    r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "abc"}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "prefill says no"
    assert len(d.received) == 1  # the 4xx never reached decode


def test_decode_errors_are_passed_back(backends: list[Backend], start_proxy: Any) -> None:
    p, d = backend(backends, "prefill"), backend(backends, "decode", status=422)
    url = start_proxy([p.url], [d.url])
    for stream in (False, True):
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "a", "stream": stream}, timeout=30)
        assert r.status_code == 422
        assert r.json()["error"]["message"] == "decode says no"
    url = start_proxy([p.url], [dead_url()])
    r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "a"}, timeout=30)
    assert r.status_code == 502
    assert metric(url, "kvtier_proxy_decode_failures_total") == 1
    r = httpx.post(url + "/v1/completions", content=b"[1, 2]", timeout=30)
    assert r.status_code == 400


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded"])
def test_policies(backends: list[Backend], start_proxy: Any, policy: str) -> None:
    a, b = backend(backends, "prefill"), backend(backends, "prefill")
    d = backend(backends, "decode")
    url = start_proxy([a.url, b.url], [d.url], policy=policy)
    held = threading.Thread(
        target=httpx.post, args=(url + "/v1/completions",),
        kwargs={"json": {"model": "m", "prompt": "held", "hold_prefill": True}, "timeout": 60},
    )
    held.start()  # round robin's first pick: a, which holds it
    assert a.holding.wait(30)
    httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "second"}, timeout=30)
    httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "third"}, timeout=30)
    a.release.set()
    held.join(60)
    # Round robin goes back to a for the third; least_loaded sees a busy.
    assert [body["prompt"] for _, body in b.received] == (
        ["second"] if policy == "round_robin" else ["second", "third"])
    assert [body["prompt"] for _, body in a.received] == (
        ["held", "third"] if policy == "round_robin" else ["held"])
    assert len(d.received) == 3


def test_health_and_models(backends: list[Backend], start_proxy: Any) -> None:
    p, d = backend(backends, "prefill"), backend(backends, "decode")
    url = start_proxy([p.url], [d.url])
    r = httpx.get(url + "/health", timeout=30)
    assert r.status_code == 200
    assert r.json() == {"prefill": {p.url: "ok"}, "decode": {d.url: "ok"}, "status": "ok"}
    assert httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"] == "model-of-decode"

    dead = dead_url()
    url = start_proxy([p.url, dead], [d.url])
    r = httpx.get(url + "/health", timeout=30)
    assert r.status_code == 503
    assert r.json()["status"] == "degraded"
    assert r.json()["prefill"][p.url] == "ok"
    assert r.json()["prefill"][dead].startswith("unreachable")


def test_usage_errors() -> None:
    out = subprocess.run([sys.executable, "-m", "kvtier.cli", "proxy", "--port", "1", "--decode", "http://x"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "--prefill" in out.stderr
