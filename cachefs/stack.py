"""Wiring of the layers under the FUSE adapter, in one place (the daemon and the tests use it).

    core (names, handles, errno) -> listing (metadata) + block reader / writer (cache) -> backend

Only this module hands the backend to the layers that may use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .backends import Backend
from .backends.tier import Tier
from .cache.prefetch import Prefetcher
from .cache.reader import BlockReader
from .cache.store import DataCache
from .cache.writer import Writer
from .fs.core import CoreFS, Settings
from .metadata import MetadataStore
from .metadata.listing import Lister


@dataclass
class Stack:
    core: CoreFS
    lister: Lister
    reader: BlockReader
    writer: Writer | None
    prefetcher: Prefetcher


def build(meta: MetadataStore, cache: DataCache, backend: Backend, settings: Settings, *,
          read_write: bool = False, writeback_interval: float = 30.0,
          prefetch_concurrency: int = 64, tier: Tier | None = None) -> Stack:
    """The layers over ``backend`` (the origin); block downloads ask ``tier`` first if given."""
    lister = Lister(meta, backend, settings.metadata_ttl)
    reader = BlockReader(cache, backend, tier)
    writer = None
    if read_write:
        writer = Writer(meta, cache, reader, backend, os.path.join(cache.root, "staging"),
                        writeback_interval=writeback_interval)

    lister.on_write_error = cache.index_write_failed
    core = CoreFS(lister, reader, writer, settings)
    lister.on_stale = core.stale
    return Stack(core, lister, reader, writer, Prefetcher(lister, reader, prefetch_concurrency))
