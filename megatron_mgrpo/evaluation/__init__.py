"""Benchmark evaluation: loaders of the paper's benchmarks (`benchmarks`) and the harness that
samples, grades and scores them through the rollout engine (`harness`)."""
