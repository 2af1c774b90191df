"""tsnet2d, the daemon. Nothing in the client library imports this package."""
