"""Benchmarks on the GPU: harness, suites, report."""
