"""The listing, inode numbers and the cache index, kept in LMDB (see ``store``)."""

from .names import split_key
from .store import ROOT_INODE, DirEntry, Kind, MetadataStore, Record

__all__ = ["ROOT_INODE", "DirEntry", "Kind", "MetadataStore", "Record", "split_key"]
