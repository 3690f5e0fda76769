"""The filesystem: core logic (``core``, testable without FUSE) and the pyfuse3 adapter."""
