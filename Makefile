# dmd-lightning. `make demo` runs the main job, `make test` the tests; both install what they need first.
PYTHON ?= python3
STAMP := .make/installed

.PHONY: install demo toy test test-slow clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q -e ".[dev]"
	@mkdir -p $(dir $@) && touch $@

install: $(STAMP)

## The README's main job on the embedded default (the 2-D toy of DMD Fig. 3 for now).
demo: toy

## DMD Fig. 3 on a 2-D mixture: three variants, a PNG and a table (about 2 minutes on 2 CPU cores).
toy: $(STAMP)
	$(PYTHON) -m dmd_lightning.toy2d_report --config configs/toy2d.yaml --out runs/toy2d

## The default test suite (CPU, no network).
test: $(STAMP)
	$(PYTHON) -m pytest -q

## Slower tests as well.
test-slow: $(STAMP)
	$(PYTHON) -m pytest -q -m "slow or not slow"

clean:
	rm -rf runs .make .pytest_cache
