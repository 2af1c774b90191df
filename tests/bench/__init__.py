"""The benchmark suite (`make bench`): tsnet2 against the bare WireGuard tunnel and raw veth.

Not part of the test suite (no ``test_*`` files here). ``python -m tests.bench.run`` is the
entry point; ``tests.bench.loadgen`` holds the load-generator processes it starts.
"""
