"""Training: pairs from benchmark folders, grouped batches, one loop shared by every encoder family."""
