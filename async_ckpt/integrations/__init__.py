"""Adapters for training frameworks, one module per framework.

Each module imports its framework lazily (inside functions or on first use),
so ``import async_ckpt`` never pulls in a framework, and a framework is an
optional dependency: an extra named after it (``pip install async-ckpt[lightning]``).
Nothing else in the package imports this room.
"""
