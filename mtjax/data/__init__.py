"""Data: tokenizers, per-task Grain pipelines, the mixture, packing, and the loader's state."""
