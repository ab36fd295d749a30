"""Decoding: KV caches (kv_cache.py) and generation (generation.py)."""
