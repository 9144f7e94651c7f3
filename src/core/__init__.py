"""The compression state every other layer builds on: masks, pattern projections and checkers, allocation,
nesting, channel graph and compaction, factorized layers, compression_info, errors, restore."""
