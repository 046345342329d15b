"""Engram's benchmarks: overhead, LoCoMo retrieval quality and scale (scripts/BENCHMARKS.md)."""
