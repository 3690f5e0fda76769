"""Reading listing pages (S3's ListBucketResult, Azure's EnumerationResults) without building a tree.

A listing page is a flat, machine-written document: a list of items, each with a few leaf
elements whose text is all we want. One regular expression finds those leaves, and the ends of
the items, in document order, in one C call per page; the caller walks the (tag, text) pairs.
ElementTree builds an element for every one of the ~10-20 leaves of each item first (Azure's List
Blobs sends ~650 bytes of properties per blob): 3-5x the CPU, held under the GIL.

The scanner reads only documents of the plain shape the stores write. Anything else (CDATA,
comments, a document type) raises ``Unreadable``, and the caller reads the page with ElementTree
instead. A page cut short never reads as a shorter listing: the root element's end tag must be
there (a listing taken for complete would drop the missing entries).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_ENTITY = re.compile(r"&(#[0-9]+|#x[0-9a-fA-F]+|lt|gt|amp|quot|apos);")
_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}


class Unreadable(ValueError):
    """Not a document of the plain shape this scanner reads."""


def scanner(leaves: Iterable[str], ends: Iterable[str]) -> re.Pattern[bytes]:
    """A pattern whose ``findall`` gives (tag, raw text) for each leaf element named in ``leaves``
    (a name may carry attributes: 'Name Encoded="true"') and (b"/" + name, b"") for each end tag
    of an item named in ``ends``, in document order."""
    names = [re.escape(n) for n in leaves] + ["/" + re.escape(n) for n in ends]
    return re.compile(("<(" + "|".join(names) + ")>([^<]*)").encode())


def scan(body: bytes, root: bytes, pattern: re.Pattern[bytes]) -> list[tuple[bytes, bytes]]:
    """``pattern.findall(body)``, once ``body`` is known to be a whole ``root`` document of the
    plain shape (else Unreadable)."""
    check(body, root)
    return pattern.findall(body)


def check(body: bytes, root: bytes) -> None:
    """Raise Unreadable unless ``body`` is a whole ``root`` document of the plain shape."""
    if b"!" in body and b"<!" in body:  # "<![CDATA[", "<!--", "<!DOCTYPE" ("!" is rare: a fast scan)
        raise Unreadable("CDATA, comment or document type")
    if not body[-len(root) - 64:].rstrip().endswith(b"</" + root + b">"):  # no copy of the page
        raise Unreadable(f"no </{root.decode()}> at the end: cut short?")


def text(raw: bytes) -> str:
    """The text of a leaf, its character and entity references replaced."""
    return unescape(raw.decode())


def unescape(value: str) -> str:
    """``value`` with its character and entity references replaced."""
    if "&" not in value:
        return value
    value = value.replace("&quot;", '"').replace("&#34;", '"')  # S3's quoted ETags: the usual case
    return _ENTITY.sub(_entity, value) if "&" in value else value


def _entity(match: re.Match[str]) -> str:
    name = match.group(1)
    if name[0] != "#":
        return _NAMED[name]
    return chr(int(name[2:], 16) if name[1] == "x" else int(name[1:]))
