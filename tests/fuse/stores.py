"""A bucket on a real server, as the tests see it: put/delete objects, and how to mount it."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Bucket:
    kind: str  # "s3" or "azure"
    name: str
    endpoint_url: str
    env: dict[str, str]  # credentials for the client and for cachefs
    client: Any = field(repr=False, default=None)

    @property
    def source(self) -> str:
        return f"s3://{self.name}" if self.kind == "s3" else f"az://{self.name}"

    @property
    def mount_args(self) -> list[str]:
        return ["--endpoint-url", self.endpoint_url] if self.kind == "s3" else []

    @property
    def mount_env(self) -> dict[str, str]:
        return dict(os.environ, **self.env)

    def put(self, key: str, data: bytes) -> None:
        if self.kind == "s3":
            self.client.put_object(Bucket=self.name, Key=key, Body=data)
        else:
            self.client.get_blob_client(key).upload_blob(data, overwrite=True)

    def put_many(self, objects: dict[str, bytes]) -> None:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda kv: self.put(*kv), objects.items()))

    def delete(self, key: str) -> None:
        if self.kind == "s3":
            self.client.delete_object(Bucket=self.name, Key=key)
        else:
            self.client.delete_blob(key)
