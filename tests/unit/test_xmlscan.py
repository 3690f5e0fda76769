"""The listing scanner on pages of the shapes the stores send, and of shapes it must not read."""

from __future__ import annotations

import email.utils
from xml.etree import ElementTree

import pytest

from cachefs.backends.azure_rest import _parse_list_blobs_tree, http_date_ts, parse_list_blobs
from cachefs.backends.s3 import _parse_listing, _parse_listing_tree, _scan_objects

S3_PAGE = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
           b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix>d/</Prefix>'
           b"<EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>"
           b"<Contents><Key>d/a+b%2Bc%25</Key><LastModified>2026-11-29T22:37:57.000Z</LastModified>"
           b"<ETag>&quot;9b2cf535f27731c974343645a3985328&quot;</ETag><Size>10</Size>"
           b"<Owner><ID>x</ID></Owner><StorageClass>STANDARD</StorageClass></Contents>"
           b"<Contents><Key>d/plain</Key><ETag>&#34;abc-2&#34;</ETag><Size>0</Size>"
           b"<LastModified>2026-11-29T22:37:58Z</LastModified></Contents>"
           b"<CommonPrefixes><Prefix>d/sub%20dir/</Prefix></CommonPrefixes>"
           b"<NextContinuationToken>tok&amp;en</NextContinuationToken></ListBucketResult>\n")

AZURE_PAGE = (b'<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint="http://x/" '
              b'ContainerName="c"><Prefix>d/</Prefix><Marker /><MaxResults>5000</MaxResults><Delimiter>/</Delimiter>'
              b"<Blobs><Blob><Name>d/a &amp; b &lt;c&gt; &#233;</Name><Properties>"
              b"<Creation-Time>Sun, 29 Nov 2026 22:38:31 GMT</Creation-Time>"
              b"<Last-Modified>Sun, 29 Nov 2026 22:38:32 GMT</Last-Modified><Etag>0x8DC1</Etag>"
              b"<Content-Length>11</Content-Length><Content-Type>text/plain</Content-Type></Properties></Blob>"
              b"<BlobPrefix><Name>d/sub/</Name></BlobPrefix>"
              b'<Blob><Name Encoded="true">d/%EF%BF%BEx</Name><Properties>'
              b"<Last-Modified>Mon, 01 Jan 2024 00:00:00 GMT</Last-Modified><Etag>\"0x8DC2\"</Etag>"
              b"<Content-Length>0</Content-Length></Properties></Blob></Blobs>"
              b"<NextMarker>2!92!MDAwMDA2</NextMarker></EnumerationResults>")


def test_s3_page_reads_as_elementtree_reads_it() -> None:
    page = _parse_listing(S3_PAGE)
    assert page == _parse_listing_tree(S3_PAGE)
    assert [(o.key, o.size, o.etag) for o in page.objects] == [
        ("d/a b+c%", 10, "9b2cf535f27731c974343645a3985328"), ("d/plain", 0, "abc-2")]
    assert page.objects[0].mtime == 1795991877.0
    assert page.prefixes == ["d/sub dir/"]
    assert page.token == "tok&en"


def s3_page(objects: list[str], prefixes: str = "", head: str = "<IsTruncated>true</IsTruncated>",
            tail: str = "<NextContinuationToken>t</NextContinuationToken><EncodingType>url</EncodingType>") -> bytes:
    return ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>b</Name>{head}{''.join(objects)}{prefixes}{tail}</ListBucketResult>").encode()


def aws_object(key: str, etag: str = "&quot;0123abcd&quot;", extra: str = "") -> str:
    return (f"<Contents><Key>{key}</Key><LastModified>2026-11-29T22:37:57.000Z</LastModified><ETag>{etag}</ETag>"
            f"{extra}<Size>{len(key)}</Size><Owner><ID>x</ID><DisplayName>y</DisplayName></Owner>"
            "<StorageClass>STANDARD</StorageClass></Contents>")


def seaweed_object(key: str) -> str:
    return (f"<Contents><Key>{key}</Key><ETag>&#34;e{len(key)}&#34;</ETag><Size>{len(key)}</Size>"
            f"<StorageClass>STANDARD</StorageClass><LastModified>2026-11-29T22:37:5{len(key) % 10}Z</LastModified>"
            "</Contents>")


KEYS = ["d/plain", "d/a+b%2Bc%25", "d/amp%26%3C", "d/x&amp;y", "d/%E2%9C%93", "d/a//b", "d/marker/"]


@pytest.mark.parametrize("shape", [aws_object, seaweed_object])
def test_s3_pages_of_one_shape_are_read_by_one_pattern(shape: object) -> None:
    """Each store's object shape, learnt from the first object: the page is read by the one-pattern
    path and says what ElementTree says (URL-decoded keys, entities, quotes off the ETags)."""
    body = s3_page([shape(k) for k in KEYS],  # type: ignore[operator]
                   "<CommonPrefixes><Prefix>d/sub%20dir/</Prefix></CommonPrefixes>")
    assert _scan_objects(body.decode()) is not None
    page = _parse_listing(body)
    assert page == _parse_listing_tree(body)
    assert [o.key for o in page.objects] == ["d/plain", "d/a b+c%", "d/amp&<", "d/x&y", "d/✓", "d/a//b", "d/marker/"]
    assert page.prefixes == ["d/sub dir/"] and page.token == "t"
    pretty = body.replace(b"><", b">\n  <")  # whitespace between elements (moto writes it)
    assert _scan_objects(pretty.decode()) is not None and _parse_listing(pretty) == page


def test_s3_pages_of_mixed_shapes_are_read_leaf_by_leaf() -> None:
    """An object unlike the first (a checksum leaf the first lacks, an unquoted or odd ETag) sends
    the page to the leaf scanner, which reads it as ElementTree does."""
    for odd in (aws_object("d/k2", extra="<ChecksumAlgorithm>CRC32</ChecksumAlgorithm>"),
                aws_object("d/k2", etag="0123"), aws_object("d/k2", etag="&quot;a&amp;b&quot;"),
                seaweed_object("d/k2")):
        body = s3_page([aws_object("d/k1"), odd, aws_object("d/k3")])
        assert _scan_objects(body.decode()) is None
        page = _parse_listing(body)
        assert page == _parse_listing_tree(body)
        assert [o.key for o in page.objects] == ["d/k1", "d/k2", "d/k3"]
    empty = s3_page([], "<CommonPrefixes><Prefix>d/p/</Prefix></CommonPrefixes>", head="", tail="")
    assert _parse_listing(empty) == _parse_listing_tree(empty)
    assert _parse_listing(empty).prefixes == ["d/p/"] and _parse_listing(empty).token is None


def test_s3_last_page_has_no_token() -> None:
    last = S3_PAGE.replace(b"<IsTruncated>true", b"<IsTruncated>false")
    assert _parse_listing(last).token is None


def test_azure_page_reads_as_elementtree_reads_it() -> None:
    page = parse_list_blobs(AZURE_PAGE)
    assert page == _parse_list_blobs_tree(AZURE_PAGE)
    assert [(o.key, o.size, o.etag) for o in page.objects] == [("d/a & b <c> é", 11, "0x8DC1"),
                                                             ("d/\ufffex", 0, "0x8DC2")]
    assert page.prefixes == ["d/sub/"]
    assert page.token == "2!92!MDAwMDA2"
    empty_marker = AZURE_PAGE.replace(b"<NextMarker>2!92!MDAwMDA2</NextMarker>", b"<NextMarker />")
    assert parse_list_blobs(empty_marker).token is None


@pytest.mark.parametrize("parse", [_parse_listing, parse_list_blobs])
def test_a_page_cut_short_is_an_error_not_a_shorter_listing(parse: object) -> None:
    """A listing taken for complete drops what it misses: a cut page must not parse."""
    body = S3_PAGE if parse is _parse_listing else AZURE_PAGE
    for cut in (len(body) // 2, len(body) - 30, len(body) - 5):
        with pytest.raises(ElementTree.ParseError):
            parse(body[:cut])  # type: ignore[operator]


def test_pages_of_another_shape_go_to_elementtree() -> None:
    cdata = S3_PAGE.replace(b"<Key>d/plain</Key>", b"<Key><![CDATA[d/plain]]></Key>")
    assert _parse_listing(cdata).objects[1].key == "d/plain"
    commented = AZURE_PAGE.replace(b"<Blobs>", b"<Blobs><!-- <Blob><Name>ghost</Name></Blob> -->")
    assert [o.key for o in parse_list_blobs(commented).objects] == ["d/a & b <c> é", "d/\ufffex"]


def test_http_dates() -> None:
    for text in ("Sun, 29 Nov 2026 22:38:32 GMT", "Mon, 01 Jan 2024 00:00:00 GMT", "Tue, 31 Dec 2030 23:59:59 GMT"):
        assert http_date_ts(text) == email.utils.parsedate_to_datetime(text).timestamp()
    with pytest.raises(ValueError):
        http_date_ts("2026-11-29T22:38:32Z")
