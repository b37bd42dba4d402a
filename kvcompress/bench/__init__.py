"""Speed benchmarks as plain library functions (decode latency vs context, compression overhead, throughput).

The Hydra entry point ``experiments/bench.py`` calls them and writes the tables; nothing here parses arguments.
"""
