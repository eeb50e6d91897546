"""kvtier's engine with paged KV in GPU memory, through the Python API.

Needs a CUDA build of the extension (the wheel, or --config=cuda) and a GPU.
CI has neither, so every test here is skipped there (the reason says which is
missing); tools/device_check.sh runs this file on a lent GPU machine with
KVTIER_REQUIRE_GPU=1, which turns the skips into failures.

Each test checks bytes against plain torch indexing of the source tensors:
the blocks a request's slots cover must come back exactly, everything else
must stay untouched.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from kvtier import _kvtier
from kvtier.engine import Engine, Namespace

REQUIRE = os.environ.get("KVTIER_REQUIRE_GPU") == "1"
_missing = None
if not torch.cuda.is_available():
    _missing = "torch sees no CUDA device"
elif not _kvtier.cuda_runtime_available():
    _missing = "this kvtier build has no CUDA kernels or cannot use the device"
if _missing is not None:
    if REQUIRE:
        raise RuntimeError(f"KVTIER_REQUIRE_GPU=1 but {_missing}")
    pytestmark = pytest.mark.skip(reason=_missing)

LAYERS, BLOCKS, HEADS, HEAD = 4, 64, 4, 128
CHUNK = 256


def make_engine(tmp_path, **over) -> Engine:
    cfg = {"chunk_size": CHUNK, "cpu_capacity": "512MiB", "disk_path": "none"}
    cfg.update(over)
    return Engine(cfg, Namespace(model="gpu-test", dtype="mixed"))


def make_kv(kind: str, dtype: torch.dtype, block: int, zeros: bool = False) -> list[torch.Tensor]:
    shape = {
        "flash_attn": (2, BLOCKS, block, HEADS, HEAD),
        "flash_infer": (BLOCKS, 2, block, HEADS, HEAD),
        "mla": (BLOCKS, block, HEAD),
    }
    gen = torch.Generator(device="cuda").manual_seed(1)
    out = []
    for _ in range(LAYERS):
        if kind == "packed_kv":
            # vLLM 0.33: one buffer, per layer a strided [blocks, heads, block, 2*head] view.
            base = torch.empty(BLOCKS, block, HEADS, 2 * HEAD, dtype=torch.float32, device="cuda")
            t = base.to(dtype).permute(0, 2, 1, 3)
        else:
            t = torch.empty(shape[kind], dtype=torch.float32, device="cuda").to(dtype)
        if zeros:
            t.zero_()
        else:
            t.copy_(torch.randn(t.shape, generator=gen, device="cuda").to(dtype))
        out.append(t)
    return out


def block_view(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The tensor's raw bytes with the block axis first (a view)."""
    raw = t.view(torch.uint8)  # byte-exact comparisons, fp8 included
    return raw.transpose(0, 1) if kind == "flash_attn" else raw


def same_blocks(a: list[torch.Tensor], b: list[torch.Tensor], kind: str, blocks) -> bool:
    idx = torch.as_tensor(list(blocks), device="cuda")
    return all(
        torch.equal(block_view(x, kind).index_select(0, idx), block_view(y, kind).index_select(0, idx))
        for x, y in zip(a, b)
    )


def all_zero(ts: list[torch.Tensor], kind: str, blocks) -> bool:
    idx = torch.as_tensor(list(blocks), device="cuda")
    return all(int(block_view(t, kind).index_select(0, idx).count_nonzero()) == 0 for t in ts)


CASES = [
    ("flash_attn", torch.bfloat16, 16),
    ("flash_infer", torch.float16, 32),
    ("packed_kv", torch.bfloat16, 16),
    ("mla", torch.float8_e4m3fn, 64),
    ("flash_attn", torch.float32, 16),
]


@pytest.mark.parametrize("kind,dtype,block", CASES, ids=[f"{k}-{str(d)[6:]}-{b}" for k, d, b in CASES])
def test_round_trip_is_byte_exact(tmp_path, kind, dtype, block):
    eng = make_engine(tmp_path)
    src = make_kv(kind, dtype, block)
    layout = eng.register_kv_caches(src, kind=kind)
    assert layout.device == "cuda:0"
    n_blocks = 20
    used = list(range(3, 3 + n_blocks))  # a request's blocks, not from 0
    tokens = np.arange(5000, 5000 + n_blocks * block - 5)  # a partial last block
    slots = np.concatenate([np.arange(b * block, (b + 1) * block) for b in used])[: len(tokens)]
    h = eng.store(tokens, torch.as_tensor(slots, device="cuda"))  # a CUDA slot mapping is accepted
    h.wait()
    assert eng.lookup(tokens) == len(tokens)

    dst = make_kv(kind, dtype, block, zeros=True)
    eng.register_kv_caches(dst, kind=kind)
    assert eng.retrieve(tokens, slots) == len(tokens)
    assert same_blocks(src, dst, kind, used[:-1])
    assert all_zero(dst, kind, [b for b in range(BLOCKS) if b not in used])
    # The last block: its first (len % block) tokens came back, the rest did not.
    tail = len(tokens) - (n_blocks - 1) * block
    for x, y in zip(src, dst):
        xb, yb = block_view(x, kind)[used[-1]], block_view(y, kind)[used[-1]]
        tok_axis = {"flash_attn": 1, "flash_infer": 1, "packed_kv": 1, "mla": 0}[kind]
        assert torch.equal(xb.narrow(tok_axis, 0, tail), yb.narrow(tok_axis, 0, tail))
        assert int(yb.narrow(tok_axis, tail, block - tail).count_nonzero()) == 0
    stats = eng.stats()
    assert stats["chunks_loaded_cpu"] == stats["chunks_stored"] > 0
    eng.close()


def test_store_waits_for_the_stream_and_load_is_ordered_on_it(tmp_path):
    eng = make_engine(tmp_path)
    kind, block = "flash_attn", 16
    src = make_kv(kind, torch.float16, block)
    kv = make_kv(kind, torch.float16, block, zeros=True)
    eng.register_kv_caches(kv, kind=kind)
    tokens = np.arange(768)
    slots = np.arange(768) + 4 * block
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the stream busy well past the store call
        for x, y in zip(kv, src):
            x.copy_(y)  # the "forward pass" writes the KV on the side stream
        h = eng.store(tokens, slots)  # current stream = side: no host sync in between
    h.wait()
    for x in kv:
        x.zero_()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        load = eng.retrieve_on_stream(tokens, slots)
        assert load.valid_tokens == 768
        snapshot = [x.clone() for x in kv]  # queued after the scatter on the same stream
    assert load.wait() == 768 and load.done()
    side.synchronize()
    assert same_blocks(src, snapshot, kind, range(4, 4 + 768 // block))
    eng.close()


def test_close_with_a_load_in_flight(tmp_path):
    eng = make_engine(tmp_path)
    kind, block = "flash_attn", 16
    src = make_kv(kind, torch.float16, block)
    eng.register_kv_caches(src, kind=kind)
    tokens, slots = np.arange(1024), np.arange(1024)
    eng.store(tokens, slots).wait()
    dst = make_kv(kind, torch.float16, block, zeros=True)
    eng.register_kv_caches(dst, kind=kind)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # the scatter is still queued when close() runs
        load = eng.retrieve_on_stream(tokens, slots)
    eng.close()  # the load keeps its chunks, its engine and its tensors
    assert eng.closed
    assert load.wait() == 1024
    assert same_blocks(src, dst, kind, range(1024 // block))
    del load  # the last reference to the closed engine goes here


def test_reload_from_disk_into_gpu(tmp_path):
    cfg = {"disk_path": str(tmp_path / "disk"), "disk_capacity": "1GiB"}
    kind, block = "flash_infer", 16
    src = make_kv(kind, torch.bfloat16, block)
    tokens = np.arange(7, 7 + 768)
    slots = np.arange(768)
    eng = make_engine(tmp_path, **cfg)
    eng.register_kv_caches(src, kind=kind)
    eng.store(tokens, slots).wait()
    eng.flush()  # write-behind reached the disk
    eng.close()

    eng = make_engine(tmp_path, **cfg)  # a new process would see the same
    dst = make_kv(kind, torch.bfloat16, block, zeros=True)
    eng.register_kv_caches(dst, kind=kind)
    assert eng.lookup(tokens) == 768
    assert eng.retrieve(tokens, slots) == 768
    assert same_blocks(src, dst, kind, range(768 // block))
    assert eng.stats()["chunks_loaded_disk"] == 3
    eng.close()


def test_bad_input_on_gpu_fails_clearly(tmp_path):
    eng = make_engine(tmp_path)
    eng.register_kv_caches(make_kv("flash_attn", torch.float16, 16), kind="flash_attn")
    with pytest.raises(ValueError, match="out of range"):
        eng.store(np.arange(32), np.arange(32) + BLOCKS * 16)
    with pytest.raises(ValueError, match="one slot per token"):
        eng.retrieve(np.arange(32), np.arange(31))
    slots = np.arange(256)
    slots[3] = -1
    with pytest.raises(ValueError, match="padding"):
        eng.store(np.arange(256), slots).wait()
    with pytest.raises(TypeError, match="stream"):
        eng.store(np.arange(256), np.arange(256), stream="side")
    # Layers on different devices or mixed CPU/GPU are refused at registration.
    mixed = make_kv("flash_attn", torch.float16, 16)
    mixed[1] = mixed[1].cpu()
    with pytest.raises(ValueError):
        eng.register_kv_caches(mixed, kind="flash_attn")
    eng.close()


@pytest.mark.parametrize("kind,dtype,block", CASES, ids=[f"{k}-{str(d)[6:]}-{b}" for k, d, b in CASES])
def test_module_gather_scatter_match_cpu_reference(kind, dtype, block):
    from kvtier import kv_layout

    src = make_kv(kind, dtype, block)
    gpu = kv_layout.make_layout(src, kind)
    cpu = kv_layout.make_layout([t.cpu() for t in src], kind)
    gen = np.random.default_rng(3)
    slots = gen.permutation(BLOCKS * block)[:300].astype(np.int64)  # scattered, any order
    slots[7] = -1  # padding: bytes left as they were
    want = kv_layout.gather(cpu, slots)
    got_dev = kv_layout.gather(gpu, torch.as_tensor(slots, device="cuda"))  # CUDA slots, CUDA out
    assert got_dev.device.type == "cuda"
    pinned = torch.empty(gpu.chunk_bytes(len(slots)), dtype=torch.uint8).pin_memory()
    kv_layout.gather(gpu, slots, out=pinned)  # CPU slots uploaded, mapped pinned out
    # The padding token's bytes were never written: compare the others only.
    row = gpu.chunk_bytes(1) // (gpu.num_layers * (2 if gpu.has_v else 1))
    keep = np.ones(gpu.chunk_bytes(len(slots)), dtype=bool).reshape(-1, len(slots), row)
    keep[:, 7, :] = False
    keep = torch.as_tensor(keep.reshape(-1))
    assert torch.equal(got_dev.cpu()[keep], want[keep])
    assert torch.equal(pinned[keep], want[keep])

    dst = make_kv(kind, dtype, block, zeros=True)
    back = kv_layout.make_layout(dst, kind)
    kv_layout.scatter(back, slots, got_dev, chunk_layout_id=gpu.layout_id)
    again = kv_layout.gather(back, slots)
    assert torch.equal(again.cpu()[keep], want[keep])


def test_module_gather_scatter_bad_input(tmp_path):
    from kvtier import kv_layout

    src = make_kv("flash_attn", torch.float16, 16)
    gpu = kv_layout.make_layout(src, "flash_attn")
    with pytest.raises(ValueError, match="pageable"):
        kv_layout.gather(gpu, np.arange(16), out=torch.empty(gpu.chunk_bytes(16), dtype=torch.uint8))
    with pytest.raises(ValueError, match="bytes"):
        kv_layout.gather(gpu, np.arange(16), out=torch.empty(gpu.chunk_bytes(15), dtype=torch.uint8, device="cuda"))
    with pytest.raises(ValueError, match="out of range"):
        kv_layout.gather(gpu, np.arange(16) + BLOCKS * 16)  # checked on the host
    bad = torch.arange(16, device="cuda") + BLOCKS * 16
    with pytest.raises(ValueError, match="out of range"):
        kv_layout.gather(gpu, bad)  # on the device: flagged by the kernel
    other = kv_layout.make_layout(make_kv("flash_infer", torch.float16, 16), "flash_infer")
    chunk = kv_layout.gather(gpu, np.arange(16))
    with pytest.raises(ValueError):
        kv_layout.scatter(other, np.arange(16), chunk, chunk_layout_id=gpu.layout_id)
