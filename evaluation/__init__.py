"""Benchmark data generators, tasks, metrics and reports."""
