# The three commands the README promises.
.PHONY: setup quickstart test bench
setup:
	bash infra/setup.sh
quickstart:
	.venv/bin/capi sweep run sweeps/quickstart.yaml
test:
	.venv/bin/python -m pytest -q
bench:
	.venv/bin/python benchmarks/run_all.py
