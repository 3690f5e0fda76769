"""How object keys become file names (documented in the README, "Keys that are not file names").

An object key is split on "/". The object is shown only if every segment can be a file name:
- a segment that is empty (``a//b``, a leading "/"), "." or ".." hides the object;
- a segment longer than 255 bytes (the Linux NAME_MAX) or containing NUL hides the object;
- a key ending in "/" is a directory marker: it makes the directory exist, and its content
  (usually empty) is never shown;
- when a key is both an object and a prefix (``a`` and ``a/b``), the directory wins and the
  object ``a`` is hidden.
Keys are text (S3 and Azure keys are UTF-8); names that are not valid UTF-8 can only come from
the ``file://`` backend and round-trip through ``surrogateescape``.
"""

from __future__ import annotations

NAME_MAX = 255


def encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def decode_name(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def split_key(rel: str) -> tuple[list[str], bool] | None:
    """Split a key relative to the mount root into (segments, is_dir_marker), or None if the
    key cannot be shown. For a marker the segments name the directory itself."""
    is_marker = rel.endswith("/")
    parts = (rel[:-1] if is_marker else rel).split("/")
    if is_marker and parts == [""]:
        return [], True  # the root's own marker
    for part in parts:
        if part in ("", ".", "..") or "\0" in part or len(encode_name(part)) > NAME_MAX:
            return None
    return parts, is_marker
