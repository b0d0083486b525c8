"""The shard writer and the event loop it runs on, used by both save paths.

The blocking ``save`` (``save_flow.py``) and the background worker
(``worker/``) write through the same pipeline; it lives here, below both, so
that neither imports the other's room.
"""
