# tsnet2 developer entry points. `make demo` and `make test` are the README's two commands.
.PHONY: demo test lint setup clean bench e2e-kind cluster-up cluster-down

demo:
	scripts/demo

test:
	scripts/test

lint:
	scripts/setup
	.venv/bin/ruff check tsnet2 operator tests
	.venv/bin/python scripts/unasync.py --check
	.venv/bin/mypy

setup:
	scripts/setup

# The benchmark suite (not part of `make test`): about 5 minutes, writes bench-results.json.
# Over the current wireguard-go when Go is here, else Debian's (scripts/with-wireguard-go).
bench:
	scripts/setup
	scripts/with-wireguard-go .venv/bin/python -m tests.bench.run

# The end-to-end suite on kind instead of the local cluster (needs a Docker engine):
# see docs/e2e.md.
e2e-kind:
	scripts/e2e-kind

# The local single-node Kubernetes cluster the end-to-end suite runs on (root; see
# docs/e2e.md): up (building what is missing) and down. While it is up, `make test` and
# `pytest tests/e2e` use it and leave it up; use it with tests/e2e/cluster/kubectl.
cluster-up:
	tests/image/build.sh
	tests/e2e/cluster/up.sh

cluster-down:
	tests/e2e/cluster/down.sh

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
