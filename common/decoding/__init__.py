"""Decoding with a split model: the speculative loop with trajectory recording (`speculative`) and
held-out agreement of the exit head (`agreement`). Imports `common.core` and `common.model`."""
