# Set-up and entry points. `make demo` and `make test` install what they need into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA := data/demo

.PHONY: install browser demo demo-mmdit demo-finetune demo-data pipeline-example test test-fast lint format benchmark gpu-wheels clean

install: $(STAMP)

# Re-installs only when setup.py changes; otherwise a no-op.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

demo-data: install
	$(PY) -m diffusion.data.synthetic --out $(DEMO_DATA)/train --num-samples 4000 --seed 0 --image-size 64 --overwrite
	$(PY) -m diffusion.data.synthetic --out $(DEMO_DATA)/val --num-samples 256 --seed 1 --image-size 64 --overwrite

# The embedded default: synthetic CC-like data -> tiny autoencoder -> tiny latent diffusion model (the production
# StableDiffusion class and train.py) -> samples.png and the prompt-following score. Both runs are one process, so
# train.py runs directly: the same code as `composer -n 1 train.py`, without the launcher, whose own import of all
# of Composer costs about 15 s on a 2-core machine before train.py imports it again.
# Each `make demo` is a new run: its run folders are cleared first, since a new run refuses a save folder that holds
# another run's checkpoints (and the demo's results would otherwise mix with the last one's).
demo: demo-data
	rm -rf runs/demo_autoencoder runs/demo
	$(PY) train.py yamls/demo_autoencoder.yaml
	$(PY) train.py yamls/demo.yaml
	@echo "Samples: runs/demo/samples.png   Results: runs/demo/demo_results.json"

# The MMDiT counterpart of `make demo`: the same data and demo autoencoder (trained here unless a previous `make
# demo` left it), a tiny SD3-style model trained with rectified flow, the same prompt-following score.
demo-mmdit: demo-data
	rm -rf runs/demo_mmdit
	test -f runs/demo_autoencoder/pretrained/vae/config.json || \
		(rm -rf runs/demo_autoencoder && $(PY) train.py yamls/demo_autoencoder.yaml)
	$(PY) train.py yamls/demo_mmdit.yaml
	@echo "Samples: runs/demo_mmdit/samples.png   Results: runs/demo_mmdit/demo_results.json"

# After `make demo`: teach its model a colour it never saw ("lime", between yellow and green) from a small synthetic
# set (half lime, half the eight old colours), once with LoRA and once with full fine-tuning, both starting from the
# demo model exported as a diffusers folder; then score the new colour and the old eight before and after (four
# seeds per prompt: with the demo's two, one image is 0.02 of the old colours' score), and print
# the per-method table (runs/demo_finetune/results.md, results.json, samples.png). DEMO_RUN names the demo's run
# folder, which is only read.
DEMO_RUN ?= runs/demo
DEMO_FT := runs/demo_finetune
demo-finetune: install
	@test -f $(DEMO_RUN)/checkpoints/latest-rank0.pt || \
		{ echo "$(DEMO_RUN)/checkpoints/latest-rank0.pt does not exist: run make demo first"; exit 1; }
	rm -rf $(DEMO_FT)
	$(PY) -m diffusion.inference.export --checkpoint $(DEMO_RUN)/checkpoints/latest-rank0.pt --out $(DEMO_FT)/base
	$(PY) -m diffusion.data.synthetic --out data/demo_finetune/train --num-samples 2000 --seed 3 --image-size 64 \
		--new-color lime --new-color-fraction 0.5 --overwrite
	$(PY) train.py yamls/demo_finetune_lora.yaml
	$(PY) train.py yamls/demo_finetune_full.yaml
	$(PY) -m diffusion.evaluation.finetune_report --base $(DEMO_FT)/base --run lora=$(DEMO_FT)/lora \
		--run full=$(DEMO_FT)/full --out $(DEMO_FT) --seeds 0 1 2 3

# The data pipeline on a small CommonCatalog-style file: ingest -> filter -> caption (2 ranks) -> report.
EXAMPLE := data/example
pipeline-example: install
	$(PY) -m diffusion.pipeline.example --out $(EXAMPLE)
	$(PY) -m diffusion.pipeline ingest --source commoncatalog --input $(EXAMPLE)/commoncatalog --out $(EXAMPLE)/ingested --overwrite
	$(PY) -m diffusion.pipeline filter --input $(EXAMPLE)/ingested --out $(EXAMPLE)/filtered --preset commercial --min-side 512 --overwrite
	$(VENV)/bin/composer -n 2 -m diffusion.pipeline caption --input $(EXAMPLE)/filtered --out $(EXAMPLE)/captioned --model $(EXAMPLE)/tiny-blip2 --overwrite
	$(PY) -m diffusion.pipeline report $(EXAMPLE)/ingested $(EXAMPLE)/filtered $(EXAMPLE)/captioned --out $(EXAMPLE)/report
	@echo "Report: $(EXAMPLE)/report/provenance.md"

# Debian's chromium and its driver, for the human-study and app browser tests (skipped, with the reason, without them).
browser:
	@command -v chromedriver >/dev/null || { if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "chromium/chromedriver missing and not root: the browser tests will be skipped"; fi; }

test: install browser
	$(VENV)/bin/pytest -n 2 --dist loadgroup tests

test-fast: install
	$(VENV)/bin/pytest -n 2 -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check diffusion tests benchmarks train.py
	$(VENV)/bin/ruff format --check diffusion tests benchmarks train.py

format: install
	$(VENV)/bin/ruff format diffusion tests benchmarks train.py
	$(VENV)/bin/ruff check --fix diffusion tests benchmarks train.py

benchmark: install
	$(PY) benchmarks/step_breakdown.py
	$(PY) benchmarks/pipeline_throughput.py

# Wheels for a lent GPU machine (Python 3.12, x86-64, its own torch 2.11), which reaches no registry: what
# benchmarks/gpu/check.sh installs there. antlr4 4.9.3 (omegaconf's parser) exists only as an sdist: built here,
# it is pure Python.
GPU_WHEELS := .whl
GPU_PLATFORMS := $(foreach n,5 12 14 17 24 27 28 31 34 35,--platform manylinux_2_$(n)_x86_64) \
	--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64
gpu-wheels: install
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d $(GPU_WHEELS) -r benchmarks/gpu/wheels.txt
	$(PY) -m pip wheel -q --no-deps -w $(GPU_WHEELS) antlr4-python3-runtime==4.9.3
	@du -sh $(GPU_WHEELS)

clean:
	rm -rf runs data/demo data/demo_finetune data/example .pytest_cache
