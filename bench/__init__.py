"""Benchmarks and the trace replay: kernel microbenchmarks, arena costs, memory policies."""
