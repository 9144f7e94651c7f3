"""Measurement: MAC/FLOP counting (and, with later work, hardware profiles and latency)."""
