"""asv benchmarks of lmmops (see ../README.md)."""
