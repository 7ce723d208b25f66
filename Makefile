# Two entry points, both self-contained on a fresh machine:
#   make quickstart   create .venv, install, run SFT then GRPO on arithmetic on CPU (about 9 minutes)
#   make test         create .venv, install .[dev], run the default test suite
# Peer baselines (Hugging Face transformers / TRL on CPU, benchmarks/peers/), in their own environment:
#   make peer-env     create .peer/venv from benchmarks/peers/requirements.txt (CPU torch)
#   make bench-peers  run the peer scripts at the configurations rljax's benchmarks are matched to
#   make bench-offline  rljax's offline trainers and TRL's at the same configuration, alternating
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PEER_VENV  := .peer/venv
PEER_PY    := $(PEER_VENV)/bin/python
PEER_STAMP := $(PEER_VENV)/.installed
PEER_REQS  := benchmarks/peers/requirements.txt
# Where the CPU build of torch comes from (an extra index: a local wheel or mirror in pip's own
# configuration still works). Empty to use pip's configuration alone: make peer-env PEER_TORCH_INDEX=
PEER_TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: quickstart test test-slow bench peer-env bench-peers bench-offline clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# An RL run: XLA's per-step buffers stay in the heap (rljax.host_memory, RLJAX_KEEP_BUFFERS): 6 min 13 s
# against 8 min 2 s on a 2-core Xeon (huge pages on in both; since they are opt-in, 6 min 42 s kept), the same
# results and peak memory. RLJAX_KEEP_BUFFERS=0 make quickstart runs it without.
quickstart: $(STAMP)
	RLJAX_KEEP_BUFFERS=$${RLJAX_KEEP_BUFFERS:-1} $(PY) -m experiments.grpo_gain

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow

bench: $(STAMP)
	$(PY) -m benchmarks.decode
	$(PY) -m benchmarks.forward_backward
	$(PY) -m benchmarks.sft
	$(PY) -m benchmarks.grpo_step

$(PEER_STAMP): $(PEER_REQS)
	test -x $(PEER_PY) || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_PY) -m pip install -q --upgrade pip
	$(PEER_PY) -m pip install -q $(if $(PEER_TORCH_INDEX),--extra-index-url $(PEER_TORCH_INDEX)) \
		"$$(grep -E '^torch==' $(PEER_REQS))"
	$(PEER_PY) -m pip install -q -r $(PEER_REQS)
	touch $(PEER_STAMP)

peer-env: $(PEER_STAMP)

bench-peers: $(PEER_STAMP)
	$(PEER_PY) benchmarks/peers/hf_generate.py
	$(PEER_PY) benchmarks/peers/trl_grpo.py
	$(PEER_PY) benchmarks/peers/trl_offline.py --trainer dpo
	$(PEER_PY) benchmarks/peers/trl_offline.py --trainer dpo --precompute-ref
	$(PEER_PY) benchmarks/peers/trl_offline.py --trainer kto
	$(PEER_PY) benchmarks/peers/trl_offline.py --trainer reward

# One process per trainer and side (peak memory is the process's), rljax then TRL, so both
# sides of a row share the machine's state; compare the ratios, not absolute seconds.
OFFLINE_TRAINERS := dpo dpo--precompute-ref kto reward
bench-offline: $(STAMP) $(PEER_STAMP)
	@for t in $(OFFLINE_TRAINERS); do \
		args="--trainer $$(echo $$t | sed 's/--/ --/')"; \
		$(PY) -m benchmarks.offline $$args; \
		$(PEER_PY) benchmarks/peers/trl_offline.py $$args; \
	done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
