"""Speed benchmarks: each compares things side by side in one process and prints ratios."""
