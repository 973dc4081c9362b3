# The commands the README promises. `quickstart` and `test` run the set-up first: on a fresh clone
# it creates .venv and installs everything (a few minutes, once); afterwards it only checks its
# stamp and the data files, which takes well under a second.
.PHONY: setup quickstart test bench
setup:
	@bash infra/setup.sh
quickstart: setup
	.venv/bin/capi sweep run sweeps/quickstart.yaml
test: setup
	.venv/bin/python -m pytest -q
bench: setup
	.venv/bin/python benchmarks/run_all.py
