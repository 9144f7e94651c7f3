"""Compression methods (one module each) and the shared compression core (masks, allocation, patterns)."""
