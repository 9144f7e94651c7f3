"""compress-run: declarative experiment pipeline for neural-network compression research."""

__version__ = "0.1.0"
