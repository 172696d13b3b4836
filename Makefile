# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test mutants clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found; set PY=/path/to/python3.11" >&2; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,viz]'
	touch $(STAMP)

demo: venv
	bash examples/demo.sh

# Two pytest-xdist workers, one test file each at a time (files share module fixtures); multi-rank tests
# spawn their own ranks on top. TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2

test: venv
	TORCHDYNAMO_DISABLE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# Not part of `make test`: one-line bugs from megatron_patch/testing/mutant_list.py, each must fail its tests.
mutants: venv
	TORCHDYNAMO_DISABLE=1 $(BIN)/python -m megatron_patch.testing.mutants

clean:
	rm -rf $(VENV) .pytest_cache
