"""FAISS indexes: choosing one for a corpus, building it from streamed batches, GPU cloning, saving.

This package knows nothing of models or of the embedding store: it takes int64 ids and float32 vectors.
"""
