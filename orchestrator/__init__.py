"""Ray Train and Tune, MLflow and the ``capi`` command around the plain-PyTorch ``capi_core``.

Import policy (for ``capi_core`` too): imports go at the top of a module. The command's modules
(``orchestrator/cli/``) defer the heavy ones, torch, Ray, MLflow and pyarrow or a module of ours that
imports them, into the command that needs them, so that ``capi --help`` is instant and ``capi train``
runs without Ray. Anywhere else an import is deferred only to break an import cycle or to postpone a
process-wide side effect. Each deferred import says why in a ``# deferred:`` comment;
``tests/test_layout.py`` holds the tree to this.
"""
