"""``python -m orchestrator.cli``: the same ``capi`` command, without the installed entry point."""

from orchestrator.cli import main

if __name__ == "__main__":
    main()
