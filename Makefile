# The two commands of the README:  `make up`  and  `make test`.
VENV ?= .venv
SIM ?= 3

.PHONY: up test lint bench clean

up:
	scripts/up --sim $(SIM)

test:
	scripts/test $(PYTEST_ARGS)

lint:
	scripts/bootstrap test
	VENV=$(VENV) scripts/lint

bench:
	scripts/bootstrap test
	$(VENV)/bin/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
