"""Benchmarks: `python -m salnet.bench NAME [args]`, one module per NAME in this package.

Each benchmark measures salnet against a baseline in the same run and reports ratios (medians of
repeats), printing one JSON object as its last line. Speed is never asserted in tests.
"""
