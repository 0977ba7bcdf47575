# dmd-lightning. `make demo` runs the main job, `make test` the tests; both install what they need first.
PYTHON ?= python3
STAMP := .make/installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install data demo pairs toy test test-slow bench teacher-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q -e ".[dev]"
	@mkdir -p $(dir $@) && touch $@

install: $(STAMP)

## Fashion-MNIST idx files from Debian's package (needs root, as on the project's machines).
data: $(FMNIST)/t10k-images-idx3-ubyte.gz
$(FMNIST)/t10k-images-idx3-ubyte.gz:
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

## The README's main job: pairs -> DMD fit -> FID with the shipped teacher, a sample grid and a table.
demo: $(STAMP) data
	$(PYTHON) -m dmd_lightning.tools.demo --out runs/demo

## The regression pairs of configs/fmnist_pairs.yaml (10,000 teacher samples, DDIM 50 steps).
pairs: $(STAMP)
	dmd pairs --config configs/fmnist_pairs.yaml

## DMD Fig. 3 on a 2-D mixture: three variants, a PNG and a table (about 70 s on 2 CPU cores).
toy: $(STAMP)
	$(PYTHON) -m dmd_lightning.toy2d.report --config configs/toy2d.yaml --out runs/toy2d

## The default test suite (CPU, no network).
test: $(STAMP) data
	$(PYTHON) -m pytest -q

## Slower tests as well.
test-slow: $(STAMP) data
	$(PYTHON) -m pytest -q -m "slow or not slow"

## Speed and memory as ratios measured side by side (runs/bench/bench.md, bench.json); a few minutes on 2 CPU cores.
bench: $(STAMP)
	$(PYTHON) -m dmd_lightning.tools.bench --out runs/bench

## Is the teacher fit to distil? x0 MSE vs a linear denoiser, ranges, label agreement, FID (minutes on a GPU).
teacher-check: $(STAMP) data
	$(PYTHON) -m dmd_lightning.fmnist.teacher_check --teacher weights/fmnist-teacher --out runs/teacher_check/fmnist-teacher.json

clean:
	rm -rf runs .make .pytest_cache
