"""The exception type of the indexers package."""


class IndexerError(Exception):
    """A request the indexers cannot meet (an index key, a memory budget, too few vectors), said in one line."""
