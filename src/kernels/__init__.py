"""Execution of compressed layers (sparse formats, later compaction and factorized layers)."""
