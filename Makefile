# tsnet2 developer entry points. `make demo` and `make test` are the README's two commands.
.PHONY: demo test lint setup clean bench e2e-kind

demo:
	scripts/demo

test:
	scripts/test

lint:
	scripts/setup
	.venv/bin/ruff check tsnet2 operator tests
	.venv/bin/mypy

setup:
	scripts/setup

# The benchmark suite (not part of `make test`): about 5 minutes, writes bench-results.json.
bench:
	scripts/setup
	.venv/bin/python -m tests.bench.run

# The kind end-to-end suite (opt-in, needs a Docker engine): see docs/kind-e2e.md.
e2e-kind:
	scripts/e2e-kind

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
