"""The client core, one face of it; see :mod:`tsnet2.client` and ``scripts/unasync.py``."""
