"""Benchmarks behind scripts/bench_*.py: phase-1 step throughput, the output projection +
loss variants, and the data feed. Each module measures and returns figures; the scripts
parse arguments and print."""
