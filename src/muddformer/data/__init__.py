"""Text to batches: the bundled corpus (corpus.py), tokenizers (tokenizers.py), `mudd prepare`'s token shards
(shards.py) and the batches read from them (batches.py)."""
