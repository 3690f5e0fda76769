"""cachefs: a caching FUSE filesystem for object storage."""
