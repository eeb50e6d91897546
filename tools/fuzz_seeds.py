#!/usr/bin/env python3
"""Writes the seed corpora of the libFuzzer targets (FUZZING.md).

    python3 tools/fuzz_seeds.py        # rewrites every corpus/<target>/seed_*

Each seed is a small valid input in the target's own input format (described
at the top of each *_fuzz.cc). Checksums are left to the targets, which
recompute them when the control byte asks (a forged file carries right ones
anyway), so this script needs no CRC32C. Crash reproducers live beside the
seeds as crash_*; this script never touches them.
"""

from __future__ import annotations

import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 4096
SEG_BLOCKS = 16
HEAD = 80  # bytes of each block carried by a disk_segment input

SEGMENT_MAGIC = 0x313047455354564B  # "KVTSEG01"
RECORD_MAGIC = 0x313043455254564B  # "KVTREC01"
REMOTE_MAGIC = 0x31304D525254564B  # "KVTRRM01"


def segment_header(index: int, gen: int, seg_bytes: int = SEG_BLOCKS * BLOCK) -> bytes:
    # magic, version, reserved0, segment_index, segment_bytes, gen, reserved1, crc
    return struct.pack("<QHHIQQII", SEGMENT_MAGIC, 1, 0, index, seg_bytes, gen, 0, 0)


def record_header(gen: int, key: tuple[int, int], payload: int, *, dead: bool = False,
                  fingerprint: int = 0x5EED, tokens: int = 16) -> bytes:
    # magic, version, flags, header_bytes, segment_gen, key_lo, key_hi,
    # fingerprint, layout_id, num_tokens, payload_crc, payload_bytes,
    # reserved, header_crc
    return struct.pack("<QHHIQQQQQIIQII", RECORD_MAGIC, 1, 1 if dead else 0, 80, gen, key[0], key[1],
                       fingerprint, 0x1A70, tokens, 0, payload, 0, 0)


def segment(blocks: dict[int, bytes]) -> bytes:
    """One segment as disk_segment reads it: HEAD bytes per block."""
    out = bytearray()
    for b in range(SEG_BLOCKS):
        out += blocks.get(b, b"").ljust(HEAD, b"\0")[:HEAD]
    return bytes(out)


def payload_head(tag: int) -> bytes:
    return bytes((tag + i) & 0xFF for i in range(HEAD))


def disk_segment_seeds() -> dict[str, bytes]:
    reseal = 0x04 | 0x08 | 0x10 | 0x20
    one = segment({
        0: segment_header(0, 1),
        1: record_header(1, (1, 100), 5000),     # 2 payload blocks
        2: payload_head(1), 3: payload_head(2),
        4: record_header(1, (2, 200), 100),      # 1 payload block
        5: payload_head(3),
    })
    # Two segments: the same key in both (the newer gen wins), a removed
    # record, and the dead filler a sealed segment ends with.
    older = segment({
        0: segment_header(0, 3),
        1: record_header(3, (7, 700), 4096),
        2: payload_head(4),
        3: record_header(3, (8, 800), 10, dead=True),
        4: payload_head(5),
        5: record_header(3, (0, 0), (SEG_BLOCKS - 6) * BLOCK, dead=True),
    })
    newer = segment({
        0: segment_header(1, 4),
        1: record_header(4, (7, 700), 3000),
        2: payload_head(6),
        3: record_header(2, (9, 900), 10),       # an earlier use of the segment: ignored
        4: payload_head(7),
    })
    # Three files, capacity 2: the third is beyond the capacity and removed.
    third = segment({0: segment_header(2, 9), 1: record_header(9, (5, 5), 1), 2: payload_head(8)})
    # The largest generation a header can carry: the next one must not wrap
    # to 0 (= empty) or below the live ones.
    last_gen = segment({
        0: segment_header(0, 2**64 - 1),
        1: record_header(2**64 - 1, (3, 300), 8000),
        2: payload_head(9), 3: payload_head(10),
    })
    return {
        "seed_max_generation": bytes([reseal | 0]) + last_gen,
        "seed_one_segment": bytes([reseal | 0]) + one,
        "seed_two_segments": bytes([reseal | 1 | 0x80]) + older + newer,
        "seed_three_files_capacity_two": bytes([reseal | 2]) + one + newer + third,
        "seed_capacity_three": bytes([reseal | 2 | 0x40]) + older + newer + one,
    }


def disk_record_header_seeds() -> dict[str, bytes]:
    return {
        "seed_valid_small": bytes([0x80 | 4]) + record_header(1, (1, 2), 100),
        "seed_no_room": bytes([0x80 | 0]) + record_header(1, (1, 2), 1),  # an 8 KiB segment holds no payload
        "seed_dead_filler": bytes([0x80 | 0x45]) + record_header(5, (0, 0), 977 * 5 * BLOCK, dead=True),
        "seed_segment_header": bytes([0x80 | 3]) + segment_header(3, 77),
    }


def catalogue_seeds() -> dict[str, bytes]:
    tokens = bytes(range(1, 25))
    repeated = bytes([7, 7, 7, 7] * 6)

    def patch(offset: int, data: bytes) -> bytes:
        return struct.pack("<HB", offset, len(data)) + data

    return {
        # control: capacity bits 0-1, 0x04 header patches, 0x08 truncate, 0x10 publish
        "seed_published_prefix": bytes([0x10 | 0, 4]) + tokens,
        "seed_all_published_64_slots": bytes([0x10 | 2, 6]) + tokens,
        "seed_writing_only": bytes([1, 6]) + tokens,
        "seed_repeated_chunks": bytes([0x10 | 1, 3]) + repeated,
        "seed_slot_patch": bytes([0x10, 6]) + tokens + patch(64 * 3, b"\x02" + b"\0" * 7 + b"\xff" * 16),
        "seed_header_patch": bytes([0x10 | 0x04, 6]) + tokens + patch(24, struct.pack("<Q", 1 << 40)),
        "seed_truncated": bytes([0x10 | 0x08, 6]) + tokens + patch(700, b"x"),
    }


def redis_url_seeds() -> dict[str, bytes]:
    urls = [
        "redis://localhost",
        "rediss://:s3cret@cache.example.com:6380/2",
        "redis://user:p%40ss@10.0.0.1:6379/0",
        "redis+cluster://:pw@h1:7000,h2:7001,[::1]:7002",
        "rediss+cluster://admin:pw@[fe80::1%25eth0]:6379/0",
        "redis://h:0",
        "kvtier:1:0123456789abcdef:{tag}rest",
    ]
    return {f"seed_{i}": u.encode() for i, u in enumerate(urls)}


def remote_record(key: tuple[int, int], fingerprint: int, tokens: int, payload: bytes) -> bytes:
    # magic, version, flags, header_bytes, key_lo, key_hi, fingerprint,
    # layout_id, payload_bytes, num_tokens, payload_crc, reserved, header_crc
    return struct.pack("<QHHIQQQQQIIII", REMOTE_MAGIC, 1, 0, 72, key[0], key[1], fingerprint, 0x1A70,
                       len(payload), tokens, 0, 0, 0) + payload


def remote_record_seeds() -> dict[str, bytes]:
    fixed = ((0x1111, 0x2222), 0x3333, 16)  # the chunk the target expects by default
    resealed = 0x01 | 0x02
    return {
        "seed_expected_chunk": bytes([resealed | (1 << 3)]) + remote_record(*fixed, bytes(range(40))),
        "seed_own_header_chunk": bytes([resealed | 0x04 | (2 << 3)]) + remote_record((5, 6), 7, 256, b"kv" * 100),
        "seed_another_chunk": bytes([resealed | (1 << 3)]) + remote_record((9, 9), 9, 16, b"x" * 10),
        "seed_too_large": bytes([resealed | 0x04 | (0 << 3)]) + remote_record(*fixed, b"y" * 17),
        "seed_truncated": bytes([resealed | 0x04 | (1 << 3)]) + remote_record(*fixed, b"z" * 30)[:-5],
    }


def write(target_dir: str, seeds: dict[str, bytes]) -> None:
    d = ROOT / target_dir
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("seed_*"):
        old.unlink()
    for name, data in seeds.items():
        (d / name).write_bytes(data)
    print(f"{d.relative_to(ROOT)}: {len(seeds)} seeds")


def main() -> None:
    write("cc/tiers/disk/fuzz/corpus/disk_segment", disk_segment_seeds())
    write("cc/tiers/disk/fuzz/corpus/disk_record_header", disk_record_header_seeds())
    write("cc/index/fuzz/corpus/catalogue", catalogue_seeds())
    write("cc/tiers/remote/fuzz/corpus/redis_url", redis_url_seeds())
    write("cc/tiers/remote/fuzz/corpus/remote_record", remote_record_seeds())


if __name__ == "__main__":
    main()
