"""kvtier.CatalogueView over engines whose catalogues live in shared memory.

The vLLM scheduler answers "how many tokens are cached" from the worker
ranks' catalogues without asking the workers (issue 9). These tests build
the ranks as real engines in this process and check the view answers what
each engine's own lookup answers, and only what every rank holds.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np
import pytest
import torch
from kvtier.catalogue import CatalogueView, catalogue_shm_name, reclaim_stale_catalogues
from kvtier.engine import Engine, KeyExtras, Namespace

LAYERS, BLOCKS, HEADS, BLOCK, HEAD = 2, 16, 2, 16, 32
CHUNK = 32
CONFIG = {"chunk_size": CHUNK, "cpu_capacity": "16MiB", "disk_path": "none", "namespace": "tenant"}
TOKENS = np.arange(9000, 9128)  # 4 chunks
SLOTS = np.arange(128)


def kv() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(BLOCKS, HEADS, BLOCK, 2 * HEAD, generator=gen) for _ in range(LAYERS)]


def ns(rank: int, world: int) -> Namespace:
    return Namespace(model="m", dtype="float32", layout="l", rank=rank, world_size=world)


@pytest.fixture
def ranks() -> Any:
    deployment = f"test-{uuid.uuid4()}"
    names = [catalogue_shm_name(deployment, r, 2) for r in range(2)]
    engines = [Engine(CONFIG, ns(r, 2), catalogue_shm_name=names[r]) for r in range(2)]
    for e in engines:
        e.register_kv_caches(kv())
    yield names, engines
    for e in engines:
        e.close()


def test_names_are_per_deployment_and_rank():
    assert catalogue_shm_name("d", 0, 2) == catalogue_shm_name("d", 0, 2)
    assert len({catalogue_shm_name("d", 0, 2), catalogue_shm_name("d", 1, 2), catalogue_shm_name("e", 0, 2)}) == 3


def test_catalogue_is_a_private_shm_object(ranks: Any) -> None:
    names, _ = ranks
    for name in names:
        st = os.stat("/dev/shm" + name)
        assert st.st_mode & 0o777 == 0o600
        assert st.st_uid == os.getuid()


def test_prefix_counts_only_where_every_rank_holds_it(ranks: Any) -> None:
    names, (r0, r1) = ranks
    view = CatalogueView([(names[0], ns(0, 2)), (names[1], ns(1, 2))], CONFIG)
    assert view.num_ranks == 2 and view.ranks_open() == 2
    assert view.lookup(TOKENS) == 0
    r0.store(TOKENS, SLOTS).wait()
    r0.flush()
    # A chunk on one rank only is a miss for the request.
    assert view.lookup_rank(0, TOKENS) == len(TOKENS) == r0.lookup(TOKENS)
    assert view.lookup_rank(1, TOKENS) == 0
    assert view.lookup(TOKENS) == 0
    r1.store(TOKENS[: 2 * CHUNK], SLOTS[: 2 * CHUNK]).wait()
    r1.flush()
    assert view.lookup(TOKENS) == 2 * CHUNK
    r1.store(TOKENS, SLOTS).wait()
    r1.flush()
    assert view.lookup(TOKENS) == len(TOKENS)


def test_view_hashes_with_the_engines_namespace_and_extras(ranks: Any) -> None:
    names, (r0, r1) = ranks
    salted = KeyExtras(salt="adapter-a")
    for e in (r0, r1):
        e.store(TOKENS, SLOTS, extras=salted).wait()
        e.flush()
    view = CatalogueView([(names[0], ns(0, 2)), (names[1], ns(1, 2))], CONFIG)
    assert view.lookup(TOKENS, extras=salted) == len(TOKENS)
    assert view.lookup(TOKENS) == 0
    assert view.lookup(TOKENS, extras=KeyExtras(salt="adapter-b")) == 0
    # Without the config's `namespace` key the view hashes other keys.
    other = CatalogueView([(names[0], ns(0, 2)), (names[1], ns(1, 2))], {**CONFIG, "namespace": ""})
    assert other.lookup(TOKENS, extras=salted) == 0


def test_a_closed_rank_counts_zero(ranks: Any) -> None:
    names, (r0, r1) = ranks
    for e in (r0, r1):
        e.store(TOKENS, SLOTS).wait()
        e.flush()
    view = CatalogueView([(names[0], ns(0, 2)), (names[1], ns(1, 2))], CONFIG, recheck_ms=0)
    assert view.lookup(TOKENS) == len(TOKENS)
    r1.close()
    assert not os.path.exists("/dev/shm" + names[1])
    assert view.lookup(TOKENS) == 0


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="at least one rank"):
        CatalogueView([], CONFIG)
    with pytest.raises(ValueError, match="shm name"):
        CatalogueView([("no-slash", ns(0, 1))], CONFIG)
    with pytest.raises(ValueError, match="rank"):
        CatalogueView([("/x", ns(2, 1))], CONFIG)


def test_second_live_owner_of_a_name_is_refused(ranks: Any) -> None:
    names, _ = ranks
    with pytest.raises(Exception, match="shared catalogue"):
        Engine(CONFIG, ns(0, 2), catalogue_shm_name=names[0])


def test_catalogues_of_killed_processes_are_reclaimed(tmp_path: Any) -> None:
    import signal
    import subprocess
    import sys

    name = catalogue_shm_name(f"killed-{uuid.uuid4()}", 0, 1)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\n"
                "from kvtier.engine import Engine, Namespace\n"
                f"e = Engine({CONFIG!r}, Namespace(model='m'), catalogue_shm_name={name!r})\n"
                "print('ready', flush=True)\n"
                "time.sleep(600)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        reclaim_stale_catalogues()
        assert os.path.exists("/dev/shm" + name), "a live owner's catalogue must stay"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert os.path.exists("/dev/shm" + name), "SIGKILL leaves the catalogue behind"
    assert reclaim_stale_catalogues() >= 1
    assert not os.path.exists("/dev/shm" + name)
