# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install, train an SAE in place on the embedded model and report
#   make test   - create .venv (+ .venv-tl3 for the legacy HookedTransformer) and run the test suite
#
# torch is installed first and pinned, so pip never swaps in a CUDA build on a CPU machine.
# On a GPU machine: make TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" test

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
VENV_TL3 := .venv-tl3
PIP_FLAGS := --disable-pip-version-check -q

.PHONY: setup demo test test-main test-tl3 bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) $(TORCH_SPEC)
	$(VENV)/bin/pip install $(PIP_FLAGS) -e ".[transformer-lens,nnsight,test]"
	touch $@

$(VENV_TL3)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_TL3)
	$(VENV_TL3)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV_TL3)/bin/pip install $(PIP_FLAGS) $(TORCH_SPEC)
	$(VENV_TL3)/bin/pip install $(PIP_FLAGS) "transformer-lens>=3.9,<4" -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/sae-hooks demo

test: test-main test-tl3

test-main: setup
	$(VENV)/bin/python -m pytest

# The TransformerLens adapter against a TL 3.x HookedTransformer (removed in TL 4).
test-tl3: $(VENV_TL3)/.installed
	$(VENV_TL3)/bin/python -m pytest tests/adapters/test_transformer_lens_adapter.py tests/saes/test_saes.py tests/hub/test_native.py \
		tests/sites/test_site_spellings.py tests/intervene/test_attach_vocabulary.py tests/sites/test_hooknames.py \
		tests/adapters/test_saelens_spellings.py tests/adapters/test_inplace_edits.py tests/adapters/test_copies_and_resets.py \
		tests/adapters/test_latent_gradients.py tests/intervene/test_attribution.py tests/sites/test_site_widths.py \
		tests/adapters/test_adapter_threads.py tests/adapters/test_error_node_grads.py

bench: setup
	$(VENV)/bin/python benchmarks/bench_splice.py

clean:
	rm -rf $(VENV) $(VENV_TL3) .pytest_cache
