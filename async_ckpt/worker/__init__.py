"""The background side: the per-rank worker process and its writer pipeline."""
