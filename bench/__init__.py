"""Benchmark scripts: `python -m bench.tasks` (pretext-task throughput)."""
