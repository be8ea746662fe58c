# eagle-grpc: the front door. `make help` lists the targets.
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 50051
HTTP_PORT ?= 8080
MODEL ?= tiny
# The torch and torchvision installed when they are not both importable: the pair that lies
# on this project's machines (a CUDA build that runs on the CPU too). torchvision is needed
# by timm (Eagle2-9B's ConvNeXt tower), and PyPI's torchvision does not load beside the
# CPU-only torch file that is also on disk. An installed pair is kept as it is.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PROTO_SRC := protos/eagle/v1/chat.proto
ESBUILD ?= clients/ts/node_modules/.bin/esbuild
ESBUILD_FLAGS := --bundle --format=esm --minify --target=es2022 --legal-comments=none --log-level=warning
# The Buf CLI (the dev extra's buf-bin) lints the contract and guards it against breaking
# changes; the baseline is the contract as released, updated only by `make proto-baseline`.
BUF ?= buf
PROTO_BASELINE := protos/eagle/v1/baseline.binpb
DEMO_DIR ?= .demo
BENCH_OUT ?= bench/results

FUZZ_SECONDS ?= 60
SOAK_REQUESTS ?= 2000

.PHONY: help install protos web proto-baseline serve demo test lint bench gpu-kit tiny-model fuzz soak docs clean

help:
	@echo "install     install the project with the server and dev extras"
	@echo "protos      regenerate protos/eagle/v1/*_pb2*.py(i) and check the contract builds"
	@echo "            for Go and Java with its declared go_package/java_package"
	@echo "web         rebuild the HTTP port's playground script (service/static/playground.js)"
	@echo "proto-baseline  make the current contract the one buf breaking compares against"
	@echo "serve       run the server on $(HOST):$(PORT) with the embedded tiny model"
	@echo "demo        make a sample image and video and call the running server"
	@echo "test        run the test suite"
	@echo "lint        ruff over the sources; buf lint and buf breaking over the contract"
	@echo "bench       run the benchmarks (table printed, JSON in $(BENCH_OUT))"
	@echo "gpu-kit     the wheels the GPU machine lacks, into .whl/ (bench/gpu.sh installs them)"
	@echo "tiny-model  write the embedded random-weight model to its cache folder"
	@echo "fuzz        atheris on the image and video decoders, FUZZ_SECONDS each"
	@echo "soak        mixed load with cancels, deadlines, poison and a restart; a ledger"
	@echo "docs        regenerate docs/settings.md from the settings' definition"

install:
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_SPEC)
	$(PYTHON) -m pip install -e ".[server,dev]"
	@# the TypeScript client's dependencies and code generator (its tests need Node.js)
	if command -v npm >/dev/null; then npm ci --prefix clients/ts --no-audit --no-fund; \
	else echo "npm not found: the TypeScript client's tests will be skipped"; fi

protos:
	$(PYTHON) -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos $(PROTO_SRC)
	$(PYTHON) -m grpc_tools.protoc -Iprotos \
		--plugin=protoc-gen-connectrpc=$$($(PYTHON) -c 'import sys, pathlib; print(pathlib.Path(sys.executable).parent / "protoc-gen-connectrpc")') \
		--connectrpc_out=protos --connectrpc_opt=protobuf=google $(PROTO_SRC)
	$(BUF) generate --template clients/ts/buf.gen.yaml
	$(BUF) generate --template clients/go/buf.gen.yaml
	$(MAKE) web
	$(PYTHON) protos/check_contract.py --buf $(BUF)

# The HTTP port's playground script: the TypeScript client and the page's code, bundled
# (checked in, so the server needs no Node.js; a test fails when it is stale).
web:
	$(ESBUILD) $(ESBUILD_FLAGS) clients/ts/playground/main.ts --outfile=service/static/playground.js

proto-baseline:
	$(BUF) build --exclude-source-info -o $(PROTO_BASELINE)

gpu-kit:
	$(PYTHON) -m bench.gpu_kit

tiny-model:
	$(PYTHON) -m service.engine.tiny

serve:
	mkdir -p $(DEMO_DIR)/media
	$(PYTHON) -m service --host $(HOST) --port $(PORT) --http-port $(HTTP_PORT) \
		--model $(MODEL) --media-root $(DEMO_DIR)/media

demo:
	$(PYTHON) -m client.demo --server $(HOST):$(PORT) --media-dir $(DEMO_DIR)/media

test:
	$(PYTHON) -m pytest -q -p no:cacheprovider

lint:
	$(PYTHON) -m ruff check .
	$(BUF) lint
	$(BUF) breaking --against $(PROTO_BASELINE)

bench:
	mkdir -p $(BENCH_OUT)
	$(PYTHON) -m bench --out $(BENCH_OUT)

fuzz:
	$(PYTHON) -m pip install "atheris>=2.3"
	$(PYTHON) fuzz/seeds.py fuzz/corpus
	PYTHONPATH=.:protos $(PYTHON) fuzz/fuzz_image.py -max_total_time=$(FUZZ_SECONDS) \
		-timeout=5 -rss_limit_mb=2048 fuzz/corpus/image
	PYTHONPATH=.:protos $(PYTHON) fuzz/fuzz_video.py -max_total_time=$(FUZZ_SECONDS) \
		-timeout=10 -rss_limit_mb=2048 fuzz/corpus/video

soak:
	$(PYTHON) -m bench.soak --requests $(SOAK_REQUESTS) --out $(BENCH_OUT)

docs:
	$(PYTHON) -m service.settings --markdown > docs/settings.md

clean:
	rm -rf $(DEMO_DIR) $(BENCH_OUT) build *.egg-info fuzz/corpus
