"""The remote tier through the installed package, against a real
redis-server the test starts: two engines (two instances, each with its own
CPU and disk tiers) share KV through Redis; configuration keys are
validated and secrets never printed; the scheduler's view counts the remote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import kvtier
import numpy as np
import pytest
import torch
from kvtier.catalogue import CatalogueView, catalogue_shm_name
from kvtier.engine import Engine, Namespace
from kvtier.testing.redis_server import RedisServer, free_port

LAYERS, BLOCKS, HEADS, BLOCK, HEAD = 2, 32, 2, 16, 32

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as r:
        yield r


def make_kv(seed: int | None) -> list[torch.Tensor]:
    if seed is None:
        return [torch.zeros(BLOCKS, HEADS, BLOCK, 2 * HEAD) for _ in range(LAYERS)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(BLOCKS, HEADS, BLOCK, 2 * HEAD, generator=gen) for _ in range(LAYERS)]


def instance(tmp_path: Path, name: str, url: str, **over: object) -> Engine:
    cfg = {"chunk_size": 32, "cpu_capacity": "64MiB", "disk_path": str(tmp_path / name), "remote_url": url}
    cfg.update(over)
    return Engine(cfg, Namespace(model="remote-test", dtype="float32"))


def test_second_instance_serves_what_the_first_stored(tmp_path: Path, redis: RedisServer) -> None:
    a = instance(tmp_path, "a", redis.url)
    src = make_kv(1)
    a.register_kv_caches(src)
    tokens = np.arange(7000, 7128)  # 4 chunks
    slots = np.arange(128) + 2 * BLOCK
    assert a.store(tokens, slots).wait() == 4
    a.flush_remote()
    assert a.stats()["remote"]["uploads"] == 4

    b = instance(tmp_path, "b", redis.url)
    dst = make_kv(None)
    b.register_kv_caches(dst)
    assert b.lookup(tokens) == 0
    assert b.lookup_remote(tokens) == 128
    assert b.retrieve_async(tokens, slots, fetch_remote=True).result() == 128
    for x, y in zip(src, dst):
        assert torch.equal(x[2:10], y[2:10])
    stats = b.stats()
    assert stats["chunks_fetched_remote"] == 4
    assert stats["remote"]["fetch_hits"] == 4 and stats["remote"]["corrupt"] == 0
    # Fetched chunks were filed locally (CPU, then write-behind to disk).
    b.flush()
    assert b.lookup(tokens) == 128
    a.close()
    b.close()


def test_corrupt_value_is_a_miss_and_nothing_wrong_is_scattered(tmp_path: Path, redis: RedisServer) -> None:
    a = instance(tmp_path, "a", redis.url)
    a.register_kv_caches(make_kv(2))
    tokens = np.arange(64)
    a.store(tokens, np.arange(64)).wait()
    a.flush_remote()
    keys = sorted(redis.cli("--scan", "--pattern", "kvtier:1:*").split())
    assert len(keys) == 2 and all(k.count(":") == 3 for k in keys)
    for k in keys:  # every chunk's value damaged in its payload
        redis.cli("setrange", k, "500", "garbage")
    b = instance(tmp_path, "b", redis.url)
    dst = make_kv(None)
    b.register_kv_caches(dst)
    assert b.lookup_remote(tokens) == 64  # EXISTS says yes ...
    assert b.retrieve_async(tokens, np.arange(64), fetch_remote=True).result() == 0  # ... the checks say no
    assert all(float(t.abs().sum()) == 0.0 for t in dst)
    assert b.stats()["remote"]["corrupt"] == 2
    a.close()
    b.close()


def test_dead_remote_is_a_miss_not_an_error(tmp_path: Path) -> None:
    e = instance(tmp_path, "a", f"redis://127.0.0.1:{free_port()}", remote_timeout_ms=100)
    e.register_kv_caches(make_kv(3))
    tokens = np.arange(64)
    assert e.store(tokens, np.arange(64)).wait() == 2  # local tiers serve
    assert e.lookup(tokens) == 64
    other = instance(tmp_path, "b", e.config.remote_url)
    other.register_kv_caches(make_kv(None))
    assert other.lookup_remote(tokens) == 0
    assert other.fetch_remote(tokens) == 0
    assert other.stats()["remote"]["errors"] >= 1
    assert other.stats()["remote"]["connected"] is False
    e.close()
    other.close()


def test_scheduler_view_counts_the_remote(tmp_path: Path, redis: RedisServer) -> None:
    """What the vLLM scheduler does: every rank's catalogue, then the remote."""
    deployment = f"remote-view-{os.getpid()}"
    engines = []
    for rank in range(2):
        ns = Namespace(model="remote-test", dtype="float32", rank=rank, world_size=2)
        cfg = kvtier.load_config({"chunk_size": 32, "cpu_capacity": "64MiB", "disk_path": str(tmp_path / f"r{rank}"),
                                  "remote_url": redis.url})
        e = Engine(cfg, ns, catalogue_shm_name=catalogue_shm_name(deployment, rank, 2))
        e.register_kv_caches(make_kv(rank))
        engines.append((e, ns))
    tokens = np.arange(300, 428)
    # Only rank 0 stores: the remote prefix needs every rank.
    engines[0][0].store(tokens, np.arange(128)).wait()
    engines[0][0].flush_remote()
    view = CatalogueView(
        [(catalogue_shm_name(f"{deployment}-other", r, 2), ns) for r, (_, ns) in enumerate(engines)],
        {"chunk_size": 32, "remote_url": redis.url},
    )
    assert view.has_remote
    assert view.lookup_with_remote(tokens) == (0, 0)
    engines[1][0].store(tokens, np.arange(128)).wait()
    engines[1][0].flush_remote()
    assert view.lookup_with_remote(tokens) == (128, 0)
    for e, _ in engines:
        e.close()


def test_config_keys_validate_and_hide_secrets(tmp_path: Path) -> None:
    with pytest.raises(kvtier.ConfigError, match="remote_url"):
        kvtier.load_config({"remote_url": "http://example:6379"})
    with pytest.raises(kvtier.ConfigError, match=r"remote_timeout_ms.*\[1, 60000\]"):
        kvtier.load_config({"remote_timeout_ms": 0})
    with pytest.raises(kvtier.ConfigError) as err:
        kvtier.load_config({"remote_password": 12345})
    assert "12345" not in str(err.value) and "***" in str(err.value)
    cfg = kvtier.load_config({"remote_url": "redis://alice:s3cret@127.0.0.1:6379/2", "remote_password": "hunter2"})
    text = cfg.describe()
    assert "s3cret" not in text and "hunter2" not in text
    assert "redis://alice:***@127.0.0.1:6379/2" in text
    secret = tmp_path / "pw"
    secret.write_text("from-a-file\n")
    cfg = kvtier.load_config({"remote_url": "redis://127.0.0.1:1", "remote_password_file": str(secret)})
    assert cfg.to_native()["remote_password"] == "from-a-file"
    assert "remote_password_file" not in cfg.to_native()
    env = {**os.environ, "KVTIER_REMOTE_URL": "redis://u:topsecret@h:1", "KVTIER_REMOTE_PASSWORD": "pw-in-env"}
    out = subprocess.run(
        [sys.executable, "-m", "kvtier.cli", "config", "--json"], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert '"remote_password": {\n    "value": "***"' in out
    assert "topsecret" not in out and "pw-in-env" not in out
    with pytest.raises(kvtier.ConfigError, match="cannot be read"):
        kvtier.load_config({"remote_password_file": str(tmp_path / "missing")}).to_native()


def test_runs_where_no_hiredis_is_installed(tmp_path: Path, redis: RedisServer) -> None:
    """hiredis is built from source into the extension: the wheel needs no
    libhiredis on the machine. The extension names none, and with every
    libhiredis file of this machine hidden (a private mount namespace binds
    /dev/null over them) two engines still share a chunk through Redis."""
    from kvtier import _kvtier

    ext = Path(_kvtier.__file__)
    needed = subprocess.run(["readelf", "-d", str(ext)], capture_output=True, text=True, check=True).stdout
    assert "hiredis" not in needed and "NEEDED" in needed
    libs = sorted(str(p) for d in ("/usr/lib", "/lib", "/usr/local/lib") for p in Path(d).rglob("libhiredis*"))
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to hide the system's libhiredis")
    script = f"""
import numpy as np
from kvtier.engine import Engine, Namespace
opts = {{"chunk_size": 32, "cpu_capacity": "16MiB", "disk_path": "none", "remote_url": "{redis.url}"}}
a = Engine(opts, Namespace(model="no-hiredis"))
b = Engine(opts, Namespace(model="no-hiredis"))
a.set_chunk_bytes(4096)
b.set_chunk_bytes(4096)
tokens = np.arange(32)
a.store_buffers(tokens, [np.full(4096, 7, dtype=np.uint8)])
a.flush_remote()
assert b.lookup_remote(tokens) == 32, b.stats()
print("ok")
"""
    hide = " && ".join(f"mount --bind /dev/null {lib}" for lib in libs) or "true"
    probe = " && ".join(f"! test -s {lib}" for lib in libs) or "true"
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"{hide} && {probe} && exec {sys.executable} -c '{script}'"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    if r.returncode != 0 and "Operation not permitted" in r.stderr:
        pytest.skip(f"mount namespaces refused here: {r.stderr.strip()}")
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.stdout, r.stderr)


def _tls_files(tmp: Path) -> tuple[Path, Path, Path]:
    def run(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, cwd=tmp)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=kvtier-ca")
    (tmp / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=kvtier-redis")
    run("openssl", "x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "srv.crt", "-days", "1", "-extfile", "san.ext")
    return tmp / "ca.crt", tmp / "srv.crt", tmp / "srv.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_and_acl_user_through_the_config_keys(tmp_path: Path) -> None:
    """rediss:// with the server's CA (remote_tls_ca_file) and an ACL user
    whose password comes from remote_password_file: the configuration a
    user writes, end to end through the engine. A wrong password is an
    engine that starts and misses, and the password shows up nowhere."""
    ca, crt, key = _tls_files(tmp_path)
    port = free_port()
    server = RedisServer(
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(crt), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
        "--user", "default", "off", "--user", "alice", "on", ">alice-pw", "~*", "+@all",
        port=port, workdir=tmp_path / "redis",
    )
    server.proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(server.dir),
         *server.extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        pw = tmp_path / "pw"
        pw.write_text("alice-pw\n")
        url = f"rediss://127.0.0.1:{port}"
        common = {"remote_username": "alice", "remote_password_file": str(pw), "remote_tls_ca_file": str(ca),
                  "remote_timeout_ms": 2000}
        a = instance(tmp_path, "a", url, **common)
        a.register_kv_caches(make_kv(5))
        tokens = np.arange(64)
        deadline = time.monotonic() + 20  # the TLS server may still be starting
        while a.stats()["remote"]["uploads"] == 0 and time.monotonic() < deadline:
            a.clear()
            a.store(tokens, np.arange(64)).wait()
            a.flush_remote()
        assert a.stats()["remote"]["uploads"] == 2, a.stats()["remote"]
        b = instance(tmp_path, "b", url, **common)
        b.register_kv_caches(make_kv(None))
        assert b.lookup_remote(tokens) == 64
        assert b.fetch_remote(tokens) == 64

        pw.write_text("wrong-pw\n")
        c = instance(tmp_path, "c", url, **common)
        c.register_kv_caches(make_kv(None))
        assert c.lookup_remote(tokens) == 0
        stats = c.stats()["remote"]
        assert stats["errors"] >= 1 and not stats["connected"]
        assert "wrong-pw" not in repr(c.stats()) and "alice-pw" not in repr(c.config)
        for e in (a, b, c):
            e.close()
    finally:
        server.stop()
