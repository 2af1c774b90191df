"""The client core: one source, two faces.

``tsnet2/client/_async`` is written for asyncio; ``scripts/unasync.py`` generates the
blocking face ``tsnet2/client/_sync`` from it. Both run on a backend module with the same
names (``_backend_async`` / ``_backend_sync``), and both share the non-I/O half
(``tsnet2.client._base``, ``tsnet2.client._http``) and the sans-IO protocol core
(``tsnet2.proto``).
"""
