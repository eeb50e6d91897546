"""CPU gather/scatter against plain torch indexing over every supported layout."""

from __future__ import annotations

import gc
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvtier import kv_layout
from kvtier.kv_layout import _kvtier

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.uint8,
]
LAYOUTS = [
    "flash_attn",
    "flash_infer",
    "packed_lbhnc",
    "packed_blnhc",
    "vllm_cpu",
    "mla",
]


def random_(t: torch.Tensor, gen: torch.Generator) -> None:
    # Random bytes (not values): copies must be byte-exact, NaN patterns included.
    flat = t.view(torch.uint8) if t.is_contiguous() else None
    if flat is not None:
        flat.copy_(torch.randint(0, 256, flat.shape, dtype=torch.uint8, generator=gen))
    else:
        raise AssertionError("allocate contiguous storage, then view it")


class Engine:
    """KV caches allocated the way each backend allocates them, plus the
    K/V accessors written the way the backend's attention reads them."""

    def __init__(
        self,
        layout: str,
        layers: int,
        blocks: int,
        block: int,
        heads: int,
        head: int,
        dtype: torch.dtype,
        seed: int = 0,
    ) -> None:
        self.layout, self.block, self.heads = layout, block, heads
        gen = torch.Generator().manual_seed(seed)
        self.tensors: list[torch.Tensor] = []
        self.k: list[torch.Tensor] = []  # [blocks, block, heads, head] views
        self.v: list[torch.Tensor | None] = []
        if layout == "packed_blnhc":
            # vLLM 0.33: one buffer, physical [B, L, N, H, C]; each layer is a
            # strided [B, H, N, C] view (not contiguous).
            self.storage = torch.empty(
                blocks, layers, block, heads, 2 * head, dtype=dtype
            )
            random_(self.storage, gen)
        for l in range(layers):
            if layout == "flash_attn":
                t = torch.empty(2, blocks, block, heads, head, dtype=dtype)
                random_(t, gen)
                k, v = t[0], t[1]
            elif layout == "flash_infer":
                t = torch.empty(blocks, 2, block, heads, head, dtype=dtype)
                random_(t, gen)
                k, v = t[:, 0], t[:, 1]
            elif layout in ("packed_lbhnc", "packed_blnhc"):
                if layout == "packed_lbhnc":
                    t = torch.empty(blocks, heads, block, 2 * head, dtype=dtype)
                    random_(t, gen)
                else:
                    t = self.storage[:, l].permute(0, 2, 1, 3)
                    assert not t.is_contiguous()
                # flash_attn.py: kv_cache.transpose(1, 2).split(head_size, dim=-1)
                k, v = t.transpose(1, 2).split(head, dim=-1)
            elif layout == "vllm_cpu":
                t = torch.empty(blocks, heads, block, 2 * head, dtype=dtype)
                random_(t, gen)
                # cpu_attn.py: view(blocks, heads, 2 * block, head).chunk(2, dim=2)
                kc, vc = t.view(blocks, heads, 2 * block, head).chunk(2, dim=2)
                k, v = kc.transpose(1, 2), vc.transpose(1, 2)
            elif layout == "mla":
                t = torch.empty(blocks, block, head, dtype=dtype)
                random_(t, gen)
                k, v = t.unsqueeze(2), None
            else:
                raise ValueError(layout)
            self.tensors.append(t)
            # Byte views (innermost axis is dense): byte-exact for every dtype.
            self.k.append(k.view(torch.uint8))
            self.v.append(None if v is None else v.view(torch.uint8))

    @property
    def kind(self) -> str:
        return "packed_kv" if self.layout.startswith("packed") else self.layout

    def parts(self) -> list[list[torch.Tensor]]:
        return [self.k, self.v] if self.v[0] is not None else [self.k]

    def chunk_view(self, buf: torch.Tensor, n: int) -> torch.Tensor:
        # [layers, K/V, tokens, row bytes]: the documented chunk format.
        return buf.view(len(self.k), len(self.parts()), n, -1)

    def reference_gather(self, slots: torch.Tensor, out: torch.Tensor) -> None:
        valid = slots >= 0
        b, o = slots[valid] // self.block, slots[valid] % self.block
        view = self.chunk_view(out, len(slots))
        for l in range(len(self.k)):
            for p, caches in enumerate(self.parts()):
                view[l, p, valid] = caches[l][b, o].reshape(len(b), -1)

    def reference_scatter(self, slots: torch.Tensor, src: torch.Tensor) -> None:
        valid = slots >= 0
        b, o = slots[valid] // self.block, slots[valid] % self.block
        view = self.chunk_view(src, len(slots))
        for l in range(len(self.k)):
            for p, caches in enumerate(self.parts()):
                c = caches[l]
                c[b, o] = view[l, p, valid].reshape(len(b), *c.shape[2:])

    def raw(self) -> list[torch.Tensor]:
        base = [self.storage] if self.layout == "packed_blnhc" else self.tensors
        return [t.view(torch.uint8) for t in base]


def make_slots(
    blocks: int, block: int, n: int, seed: int, start: int, pad_every: int
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(blocks, generator=gen)
    pos = torch.arange(n) + start
    slots = order[(pos // block) % blocks] * block + pos % block
    if pad_every:
        slots[pad_every - 1 :: pad_every] = -1
    return slots.to(torch.int64)


GRID = list(itertools.product(LAYOUTS, DTYPES, [16, 32, 128]))


@pytest.mark.parametrize(("layout", "dtype", "block"), GRID)
def test_gather_scatter_match_torch_indexing(
    layout: str, dtype: torch.dtype, block: int
) -> None:
    layers, heads, head = 4, 2, 32
    blocks = (300 + 7) // block + 3
    eng = Engine(layout, layers, blocks, block, heads, head, dtype, seed=block)
    lay = kv_layout.make_layout(
        eng.tensors, kind=eng.kind if layout.startswith("packed") else "auto"
    )
    assert lay.kind == eng.kind
    assert (
        lay.num_layers == layers
        and lay.block_size == block
        and lay.num_blocks == blocks
    )
    assert lay.head_size == head and lay.num_heads == (1 if layout == "mla" else heads)
    assert lay.elem_size == torch.empty(0, dtype=dtype).element_size()
    # Token counts that are not multiples of the block (or of a 256 chunk),
    # mid-block starts and padding slots.
    for n, start, pad in [(1, 0, 0), (45, 7, 0), (300, 3, 5)]:
        slots = make_slots(blocks, block, n, seed=n, start=start, pad_every=pad)
        sentinel = 0xA5
        got = torch.full((lay.chunk_bytes(n),), sentinel, dtype=torch.uint8)
        kv_layout.gather(lay, slots, got)
        want = torch.full_like(got, sentinel)
        eng.reference_gather(slots, want)
        assert torch.equal(got, want), (layout, dtype, block, n)

        # Scatter fresh bytes; an identical engine updated by torch indexing
        # must end up byte-identical (valid slots written, nothing else).
        src = torch.randint(0, 256, (lay.chunk_bytes(n),), dtype=torch.uint8)
        twin = Engine(layout, layers, blocks, block, heads, head, dtype, seed=block)
        for t, u in zip(eng.raw(), twin.raw()):
            assert torch.equal(t, u)
        kv_layout.scatter(lay, slots, src, chunk_layout_id=lay.layout_id)
        twin.reference_scatter(slots, src)
        for t, u in zip(eng.raw(), twin.raw()):
            assert torch.equal(t, u), (layout, dtype, block, n)
        twin.reference_scatter(slots, want)  # undo, for the next round's twin
        kv_layout.scatter(lay, slots, want)


def test_many_layers_and_threads() -> None:
    eng = Engine("flash_attn", 32, 40, 16, 4, 64, torch.float16, seed=3)
    lay = kv_layout.make_layout(
        {f"model.layers.{i}.attn": t for i, t in enumerate(eng.tensors)}
    )
    slots = make_slots(40, 16, 600, seed=1, start=5, pad_every=9)
    one = kv_layout.gather(lay, slots, num_threads=1)
    many = kv_layout.gather(lay, slots, num_threads=4)
    want = torch.zeros_like(one)
    eng.reference_gather(slots, want)
    valid = torch.zeros(lay.chunk_bytes(600), dtype=torch.bool).view(32, 2, 600, -1)
    valid[:, :, slots >= 0] = True
    valid = valid.flatten()
    assert torch.equal(one[valid], want[valid])
    assert torch.equal(many[valid], one[valid])
    assert lay.layer_offset(31, 600) == 31 * lay.layer_bytes(600)
    assert lay.chunk_bytes(600) == 32 * 2 * 600 * 4 * 64 * 2


def test_numpy_buffers_and_layout_keeps_tensors_alive() -> None:
    arrays = [
        np.random.default_rng(i).random((2, 6, 16, 2, 8), dtype=np.float32)
        for i in range(3)
    ]
    ids = [id(a) for a in arrays]
    lay = kv_layout.make_layout(arrays)
    del arrays
    gc.collect()
    assert [id(a) for a in lay.tensors] == ids  # the layout owns references
    slots = np.array([3, 4, -1, 40], dtype=np.int64)
    out = bytearray(lay.chunk_bytes(4))
    _kvtier.gather(lay, slots, out)
    a0 = lay.tensors[0]
    got = np.frombuffer(bytes(out), dtype=np.float32).reshape(3, 2, 4, 16)
    np.testing.assert_array_equal(got[0, 0, 0], a0[0, 0, 3].reshape(-1))
    np.testing.assert_array_equal(got[0, 1, 3], a0[1, 2, 8].reshape(-1))
    assert "flash_attn" in repr(lay)


def test_layout_id_is_stable_and_compatibility_checked() -> None:
    a = Engine("flash_attn", 2, 4, 16, 2, 32, torch.float16)
    b = Engine("flash_attn", 2, 9, 16, 2, 32, torch.float16)  # more blocks: same id
    c = Engine("flash_attn", 2, 4, 16, 2, 32, torch.bfloat16)  # same bytes, other dtype
    la, lb, lc = (kv_layout.make_layout(e.tensors) for e in (a, b, c))
    assert la.layout_id == lb.layout_id != lc.layout_id
    la.check_compatible(lb.layout_id)
    slots = torch.arange(8)
    chunk = kv_layout.gather(la, slots)
    with pytest.raises(
        _kvtier.InvalidArgumentError, match="does not match this KV layout"
    ):
        kv_layout.scatter(lc, slots, chunk, chunk_layout_id=la.layout_id)
    with pytest.raises(ValueError, match="does not match"):
        lc.check_compatible(la.layout_id)


def bad(match: str, exc: type[BaseException] = _kvtier.InvalidArgumentError):
    return pytest.raises(exc, match=match)


def test_layout_errors_name_the_problem() -> None:
    good = [torch.zeros(2, 4, 16, 2, 8, dtype=torch.float16) for _ in range(2)]
    with bad("unsupported KV dtype 'int64'"):
        kv_layout.make_layout([torch.zeros(2, 4, 16, 2, 8, dtype=torch.int64)])
    with bad("unsupported device 'meta'"):
        kv_layout.make_layout(
            [torch.empty(2, 4, 16, 2, 8, dtype=torch.float16, device="meta")]
        )
    with bad("rank 2"):
        kv_layout.make_layout([torch.zeros(16, 8, dtype=torch.float16)])
    with bad("rank 5 .* needs rank 3"):
        kv_layout.make_layout(good, kind="mla")
    with bad(r"layer 1: strides \[.*\] differ from layer 0"):
        kv_layout.make_layout(
            [good[0], torch.zeros(2, 16, 4, 2, 8, dtype=torch.float16).transpose(1, 2)]
        )
    with bad(r"layer 1: dtype bfloat16 .* differs from layer 0 float16"):
        kv_layout.make_layout(
            [good[0], torch.zeros(2, 4, 16, 2, 8, dtype=torch.bfloat16)]
        )
    with bad(r"layer 1: shape"):
        kv_layout.make_layout(
            [good[0], torch.zeros(2, 5, 16, 2, 8, dtype=torch.float16)]
        )
    with bad("innermost .* stride is 2"):
        kv_layout.make_layout(
            [torch.zeros(2, 4, 16, 2, 16, dtype=torch.float16)[..., ::2]]
        )
    with bad("unknown KV layout kind 'nhd'"):
        kv_layout.make_layout(good, kind="nhd")
    with bad("no layers"):
        kv_layout.make_layout([])
    with bad("vllm_cpu needs a dense"):
        kv_layout.make_layout([torch.zeros(4, 2, 16, 80)[..., :64]], kind="vllm_cpu")


def test_copy_errors_name_the_problem() -> None:
    t = [torch.zeros(2, 4, 16, 2, 8, dtype=torch.float16)]
    lay = kv_layout.make_layout(t)
    with bad(r"slot_mapping\[2\] = 64 is out of range"):
        kv_layout.gather(lay, [0, 1, 64])
    with bad(r"chunk buffer is 10 bytes but 3 tokens .* need 192"):
        _kvtier.gather(lay, torch.arange(3), torch.empty(10, dtype=torch.uint8))
    with bad("slot_mapping must be int64"):
        _kvtier.gather(
            lay, torch.arange(3, dtype=torch.int32), torch.empty(192, dtype=torch.uint8)
        )
    with bad("out must be contiguous"):
        _kvtier.gather(lay, torch.arange(3), torch.empty(384, dtype=torch.uint8)[::2])
    with bad("out: .*"):
        _kvtier.gather(lay, torch.arange(3), bytes(192))  # read-only buffer
    with bad("num_threads is 0"):
        _kvtier.gather(lay, torch.arange(3), torch.empty(192, dtype=torch.uint8), 0)
    with bad("scatter: slot_mapping"):
        kv_layout.scatter(lay, [0, -1, 99], torch.empty(192, dtype=torch.uint8))


def test_cuda_probe_is_false_without_a_gpu() -> None:
    # The CPU extension never claims CUDA; a CUDA build (the wheel) answers
    # from the driver, so on a machine without a GPU it must say False.
    # tests/gpu requires True on a GPU machine.
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/gpu checks the probe")
    assert kv_layout.cuda_runtime_available() is False
