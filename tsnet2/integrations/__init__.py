"""HTTP client libraries on the tailnet, on their public extension points.

Each module plugs one library's connection layer into :class:`tsnet2.Server` /
:class:`tsnet2.AsyncServer`, so every connection is a ``dial`` through tsnet2d (and so
in its traffic log), tailnet names resolve, and pooled connections reconnect:

- :mod:`tsnet2.integrations.httpx`: ``TailnetTransport`` / ``AsyncTailnetTransport``
  (extra ``httpx``); ``Server.http_client()`` returns a ready ``httpx.Client``.
- :mod:`tsnet2.integrations.requests`: ``TailnetAdapter`` for a ``requests.Session``
  (extra ``requests``), on urllib3 connection classes that dial.
- :mod:`tsnet2.integrations.aiohttp`: ``TailnetConnector`` for an
  ``aiohttp.ClientSession`` (extra ``aiohttp``).
- :mod:`tsnet2.integrations.http_client`: ``HTTPConnection``/``HTTPSConnection`` for the
  standard library's ``http.client`` (no extra).

``import tsnet2`` never imports this package; each module but ``http_client`` needs its
extra (``pip install 'tsnet2[httpx]'``) and says so if it is missing. See docs/client.md,
"HTTP clients".
"""
