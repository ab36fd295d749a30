"""The model in other formats: the published checkpoints (published.py), model folders on disk (folders.py)
and the transformers classes (hf.py). The core model never imports them."""
