"""SOURCE parsing and option resolution: what a user types, what cachefs understands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from cachefs import config
from cachefs.errors import UsageError
from cachefs.source import parse_source


@pytest.mark.parametrize(
    ("text", "kind", "bucket", "prefix", "account"),
    [
        ("s3://my-bucket", "s3", "my-bucket", "", None),
        ("s3://my-bucket/train/imgs/", "s3", "my-bucket", "train/imgs/", None),
        ("az://data/x", "azure", "data", "x/", None),
        ("wasbs://data@acct1.blob.core.windows.net/a/b", "azure", "data", "a/b/", "acct1"),
        ("wasb://data@acct1.blob.core.windows.net", "azure", "data", "", "acct1"),
        ("https://acct1.blob.core.windows.net/data/p", "azure", "data", "p/", "acct1"),
        ("file:///srv/data/", "file", "/srv/data", "", None),
    ],
)
def test_parse_source(text: str, kind: str, bucket: str, prefix: str, account: str | None) -> None:
    src = parse_source(text)
    assert (src.kind, src.bucket, src.prefix, src.account) == (kind, bucket, prefix, account)


def test_cos_needs_endpoint() -> None:
    with pytest.raises(UsageError, match="endpoint"):
        parse_source("cos://bucket")
    assert parse_source("cos://bucket/p", endpoint_url="https://cos.example").prefix == "p/"


@pytest.mark.parametrize("text", ["ftp://x/y", "bucket/prefix", "s3://", "s3://UPPER", "file://rel/dir",
                                  "wasbs://nocontainer.blob.core.windows.net/"])
def test_bad_sources_are_one_line(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_source(text)
    assert "\n" not in str(info.value)


def test_namespaces_differ_per_source_and_endpoint() -> None:
    a = parse_source("s3://bkt/x").namespace("http://one")
    assert a == parse_source("s3://bkt/x/").namespace("http://one")
    assert a != parse_source("s3://bkt/y").namespace("http://one")
    assert a != parse_source("s3://bkt/x").namespace("http://two")


def _args(**kw: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    ns = parser.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_precedence_cli_env_file(tmp_path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('source = "s3://b"\nmountpoint = "/mnt/x"\ncache_size = "1G"\n'
                        'metadata_ttl = "1h"\nprefetch_concurrency = 8\n')
    cfg = config.resolve(_args(config=str(cfg_file)), {"CACHEFS_PREFETCH_CONCURRENCY": "16"})
    assert cfg.cache_size == 1 << 30 and cfg.metadata_ttl == 3600 and cfg.prefetch_concurrency == 16
    cfg = config.resolve(_args(config=str(cfg_file), prefetch_concurrency="32"),
                         {"CACHEFS_PREFETCH_CONCURRENCY": "16"})
    assert cfg.prefetch_concurrency == 32 and cfg.source == "s3://b" and cfg.mountpoint == "/mnt/x"


@pytest.mark.parametrize(("option", "value"), [
    ("cache_size", "lots"), ("cache_size", "0"), ("metadata_ttl", "-1"), ("prefetch_concurrency", "0"),
    ("file_mode", "999"), ("cache_policy", "fifo"), ("log_level", "loud"),
])
def test_bad_values_are_usage_errors(option: str, value: str) -> None:
    with pytest.raises(UsageError) as info:
        config.resolve(_args(source="s3://b", mountpoint="/m", **{option: value}), {})
    assert "\n" not in str(info.value)


def test_bad_config_file(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("cache_size = \n")
    with pytest.raises(UsageError, match=r"bad\.toml"):
        config.resolve(_args(config=str(bad), source="s3://b", mountpoint="/m"), {})
    bad.write_text('no_such_option = 1\n')
    with pytest.raises(UsageError, match="unknown option"):
        config.resolve(_args(config=str(bad), source="s3://b", mountpoint="/m"), {})
    with pytest.raises(UsageError, match="does not exist"):
        config.resolve(_args(config=str(tmp_path / "missing.toml"), source="s3://b", mountpoint="/m"), {})


def test_sizes_and_durations() -> None:
    assert config.parse_size("200G") == 200 << 30
    assert config.parse_size("1.5MiB") == 3 << 19
    assert config.parse_duration("30m") == 1800
    assert config.parse_duration("0") == 0


def test_cache_size_as_a_share_of_the_disk(tmp_path: Path) -> None:
    from cachefs.config import Fraction, parse_cache_size
    from cachefs.mount import cache_capacity

    assert parse_cache_size("90%") == Fraction(0.9) and parse_cache_size("2G") == 2 << 30
    for bad in ("0%", "101%", "-5%", "%"):
        with pytest.raises(ValueError):
            parse_cache_size(bad)
    st = os.statvfs(tmp_path)
    assert cache_capacity(str(tmp_path), Fraction(0.5)) == st.f_blocks * st.f_frsize // 2
