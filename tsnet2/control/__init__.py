"""Coordination server: HTTP API (aiohttp), Store interface + SQLite store, CLI.

Import what you need from its modules (:mod:`tsnet2.control.server`,
:mod:`tsnet2.control.store`, :mod:`tsnet2.control.sqlite_store`, ...); this package imports
nothing, so importing one pure module (``names``, ``store``) does not load aiohttp or SQLite.
The daemon's client of this server is :mod:`tsnet2.controlclient`, a package of its own.
"""
