# tsnet2 developer entry points. `make demo` and `make test` are the README's two commands.
.PHONY: demo test lint setup clean

demo:
	scripts/demo

test:
	scripts/test

lint:
	scripts/setup
	.venv/bin/ruff check tsnet2 tests
	.venv/bin/mypy

setup:
	scripts/setup

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
