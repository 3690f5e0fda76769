"""A store that refuses conditional GETs (If-Match) still works, and still never mixes versions;
a refusal is not retried for --backend-timeout."""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

from cachefs.testing.servers import Server
from tests.fuse.mounts import mounted

from .helpers import daemon_log, faulty_bucket


def test_store_without_if_match_is_read_and_checked_by_etag(seaweed: Server, tmp_path: Path) -> None:
    with faulty_bucket(seaweed, f"im-{uuid.uuid4().hex[:10]}") as fb:
        b, proxy = fb.bucket, fb.proxy
        rng = random.Random(2)
        objects = {f"f{i}": rng.randbytes(50_000) for i in range(20)} | {"big": rng.randbytes(9 << 20)}
        b.put_many(objects)
        proxy.refuse_if_match = True
        args = [*b.mount_args, "--backend-timeout", "30", "--metadata-ttl", "1"]
        with mounted(b.source, tmp_path / "mnt", tmp_path / "cache", b.mount_env, *args) as m:
            started = time.monotonic()
            for rel, data in objects.items():
                assert (m.path / rel).read_bytes() == data
            # One refusal, then GETs without If-Match: far less than the 30 s retry budget.
            assert time.monotonic() - started < 20
            assert "refuses conditional GETs" in daemon_log(tmp_path / "cache")
            # A reader that opened the old version of a large object never gets the new one's
            # bytes: the response ETag is checked.
            with open(m.path / "big", "rb") as f:
                head = f.read(1 << 20)
                b.put("big", rng.randbytes(9 << 20))
                try:
                    rest = f.read()
                except OSError as exc:
                    assert exc.errno == 116  # ESTALE
                else:
                    assert head + rest == objects["big"]  # served whole from the old version's cache
