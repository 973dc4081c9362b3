"""Export: a run's EMA teacher encoder as timm-loadable safetensors, a config and a model card.

The export directory holds

* ``model.safetensors``: ``Encoder.vit.state_dict()`` of the checkpoint's EMA teacher, in timm's key
  layout (no pickle anywhere);
* ``config.json``: ``architecture``, a name that says what the network is (``capi_vit_w128_d4_h4_p7_reg4_gap_28``:
  width, depth, heads, patch, registers, mean pooling, input size), and ``model_args`` such that
  ``timm.models.vision_transformer.VisionTransformer(**cfg["model_args"])`` builds it and
  ``load_state_dict`` fills it with no missing or unexpected key and no warning; ``pretrained_cfg``
  (input size, mean, std) for timm's data helpers; the training configuration without this
  machine's paths, the swept values as the config types them, and where the weights came from;
* ``README.md``: a model card (metrics, configuration, data, sweep, how to load).

``export_run`` picks a run's checkpoint through the ``capi.checkpoint`` tag that tracking writes,
logs the directory as the run's ``export`` artifacts and registers it as a version of a registered
model with the alias ``champion``. MLflow 3's ``register_model("runs:/<id>/<dir>")`` only accepts
logged models (on a plain artifact directory it fails with "Unable to find a logged_model" and leaves an
empty registered model behind), so the version is created from the artifacts' URI directly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
from mlflow.exceptions import MlflowException
from safetensors.torch import save_file

from capi_core.atomic import atomic_directory
from capi_core.checkpoint import STATE, CheckpointError, find_checkpoint, load_encoder
from capi_core.config import TrainConfig, flatten
from capi_core.data import resolve_dataset
from capi_core.data.format import load_manifest
from capi_core.errors import CapiError
from orchestrator.tracking import (CHECKPOINT_TAG, PARENT_TAG, ROLE_TAG, SWEEP_TAG, SWEPT_TAG, TRIAL_TAG, child_runs,
                                   mlflow_client, safe_uri)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
ARTIFACT_DIR = "export"
ALIAS = "champion"
TIMM_CLASS = "timm.models.vision_transformer.VisionTransformer"
MACHINE_FIELDS = ("run.output_dir", "data.cache_dir", "run.name")  # left out of config.json's training


class ExportError(CapiError, RuntimeError):
    """Nothing to export, or the export cannot be written; the message says which run or file."""


@dataclass
class Exported:
    out: Path
    run_id: str | None
    metric: str | None
    value: float | None
    model_name: str | None = None
    version: str | None = None


# -------------------------------------------------------------------------------- the directory
def export_checkpoint(checkpoint: str | Path, out: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write the EMA teacher of ``checkpoint`` (a checkpoint or run directory) to ``out``.

    ``provenance`` (run id, sweep, trial values, metrics) goes into config.json and the card. The
    directory is built beside ``out`` and renamed into place, replacing an earlier export.
    """
    checkpoint = find_checkpoint(checkpoint) or Path(checkpoint)
    try:
        encoder, config = load_encoder(checkpoint, "teacher")
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    if encoder.timm_architecture is None:
        raise ExportError(f"{checkpoint} is a model.pos_embed=rope encoder (CAPI's own RoPE ViT, the vit-* presets), "
                          "which plain timm cannot build; load it with capi_core.checkpoint.load_encoder(path) "
                          "(an Encoder whose .vit is the network), or train with model.pos_embed=learned to export "
                          "timm weights")
    state = json.loads((checkpoint / STATE).read_text())
    provenance = dict(provenance or {})
    provenance.setdefault("checkpoint", str(checkpoint))  # a downloaded checkpoint's own URI, not the download's
    swept = provenance.pop("swept", None)
    if swept is not None:  # typed as the config types them (MLflow params are strings)
        flat = flatten(config)
        provenance["trial_params"] = {k: flat.get(k) for k in swept}
    provenance = {**provenance, "step": state.get("step"),
                  "checkpoint_metrics": {k: v for k, v in state.get("metrics", {}).items() if _finite(v)}}
    cfg = export_config(encoder, config, provenance)

    out = Path(out).expanduser().absolute()
    with atomic_directory(out) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in encoder.vit.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")
        (tmp / CARD).write_text(model_card(cfg, config))
    return out


def export_config(encoder, config: TrainConfig, provenance: dict[str, Any]) -> dict[str, Any]:
    """config.json: how timm builds the model, how inputs are normalised, and where it came from."""
    c = config.model
    data = _dataset_facts(config)
    input_size = [c.in_chans, c.img_size, c.img_size]
    return {
        "architecture": architecture_name(config),
        "model_class": TIMM_CLASS,
        "model_args": encoder.timm_model_args(),
        # For timm's data helpers (timm.data.resolve_data_config); input_size also keeps timm from
        # adapting the patch embedding to 3 channels when the weights are loaded through pretrained_cfg_overlay.
        "pretrained_cfg": {"input_size": input_size, "mean": data.get("mean"), "std": data.get("std"),
                           "num_classes": 0},
        "num_features": c.embed_dim,
        "num_registers": c.registers,
        "input_size": input_size,
        # The training reader's normalisation (the dataset manifest's statistics, 0-1 scale).
        "mean": data.get("mean"),
        "std": data.get("std"),
        "dataset": data,
        "training": portable_config(config),
        "source": provenance,
    }


def architecture_name(config: TrainConfig) -> str:
    """What the exported network is, in timm's naming style: ``capi_vit_w128_d4_h4_p7_reg4_gap_28`` is width
    128, depth 4, 4 heads, patch 7, 4 registers, mean-pooled patches, 28x28 inputs. No timm
    name fits these small shapes (timm's names fix the width, depth and input size), so the
    network is built from ``TIMM_CLASS`` and ``model_args`` rather than from a registered name."""
    m = config.model
    return (f"capi_vit_w{m.embed_dim}_d{m.depth}_h{m.num_heads}_p{m.patch_size}_reg{m.registers}_gap_"
            f"{m.img_size}")


def portable_config(config: TrainConfig) -> dict[str, Any]:
    """The flattened training config without what only meant something on the training machine:
    where the run wrote (a sweep's trial directory), the cache, the run's name there."""
    return {k: v for k, v in flatten(config).items() if k not in MACHINE_FIELDS}


def _dataset_facts(config: TrainConfig) -> dict[str, Any]:
    facts: dict[str, Any] = {"name_or_path": config.data.dataset, "split": config.data.split}
    try:
        manifest = load_manifest(resolve_dataset(config.data.dataset, config.data.cache_dir))
    except (OSError, ValueError):  # not on this machine: the card says so
        return facts
    return {**facts, "name": manifest.name, "splits": manifest.splits, "classes": manifest.class_names,
            "image_size": list(manifest.image_size), "channels": manifest.channels,
            "mean": manifest.mean, "std": manifest.std}


def model_card(cfg: dict[str, Any], config: TrainConfig) -> str:
    """The README.md of an export."""
    source, data, m = cfg["source"], cfg["dataset"], config.model
    name = source.get("run_name") or config.run.name
    lines = [f"# {name}: CAPI-pretrained ViT encoder", "",
             f"A {m.depth}-block ViT (width {m.embed_dim}, {m.num_heads} heads, patch {m.patch_size}, "
             f"{m.img_size}x{m.img_size}x{m.in_chans} input, {m.registers} registers, {m.pos_embed} positions) "
             f"pretrained with CAPI (cluster-and-predict latent patches). The weights are the EMA teacher "
             f"encoder at step {source.get('step')} of {config.optim.steps}, in timm's layout "
             f"(`{cfg['architecture']}`: timm's `VisionTransformer` with the model arguments in config.json).", "",
             "## Metrics", ""]
    metrics = {**source.get("checkpoint_metrics", {})}
    if metrics:
        lines += ["Measured at the exported checkpoint:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("The checkpoint holds no metrics.")
    if source.get("metric") is not None:
        lines += ["", f"Selected as the {source.get('mode', 'max')} of `{source['metric']}` "
                      f"({source.get('value'):.4g} in MLflow)."]
    if "probe/knn_gain" in metrics:
        lines += ["", f"Against the same architecture at its seeded random initialisation, on the same probe "
                      f"images: k-NN {metrics['probe/knn_top1']:.1f} % trained, "
                      f"{metrics['probe/knn_random_init']:.1f} % untrained, a gain of "
                      f"**{metrics['probe/knn_gain']:+.1f} points** (`probe/knn_gain`)."]
    lines += ["", "`probe/knn_top1` is the online weighted k-NN top-1 (%) of mean-pooled patch features on fixed "
                  "labelled subsets of the dataset, a cheap proxy, not a benchmark result; "
                  "`probe/knn_random_init` is the same probe of the untrained network.", "", "## Data", ""]
    if "name" in data:
        splits = ", ".join(f"{k}: {v}" for k, v in data["splits"].items())
        lines += [f"Dataset `{data['name']}` ({data['name_or_path']}), split `{data['split']}`; images per split: "
                  f"{splits}; {data['channels']} channel(s), stored at {data['image_size'][0]}x"
                  f"{data['image_size'][1]}; classes: {', '.join(data['classes'][:20])}"
                  + (" ..." if len(data["classes"]) > 20 else "") + ".",
                  f"Inputs are normalised with mean {data['mean']} and std {data['std']} (0-1 scale)."]
    else:
        lines.append(f"Dataset `{data['name_or_path']}` (not available where this export was made; mean and std "
                     f"are unknown).")
    lines += ["", "## Sweep", ""]
    if source.get("sweep"):
        lines.append(f"Trial `{source.get('trial_id')}` of sweep `{source['sweep']}` (MLflow parent run "
                     f"`{source.get('parent_run_id')}`).")
        for k, v in (source.get("trial_params") or {}).items():
            lines.append(f"- `{k}` = {v}")
    else:
        lines.append("Not part of a sweep.")
    lines += ["", "## Configuration", "",
              f"{config.optim.steps} steps, global batch {config.optim.batch_size}, lr {config.optim.lr:g}; masking "
              f"{config.masking.strategy} at {config.masking.ratio:g}; {config.clustering.num_clusters} clusters; "
              f"temperatures student {config.loss.student_temp:g}, teacher {config.loss.teacher_temp:g}. "
              f"The full configuration is `training` in config.json.", "",
              "## How to load", "", "```python", "import json, torch",
              "from safetensors.torch import load_file",
              "from timm.models.vision_transformer import VisionTransformer", "",
              'cfg = json.load(open("config.json"))',
              'model = VisionTransformer(**cfg["model_args"]).eval()',
              'model.load_state_dict(load_file("model.safetensors"))',
              'x = torch.rand(1, *cfg["input_size"])  # images in [0, 1]',
              'x = (x - torch.tensor(cfg["mean"]).view(-1, 1, 1)) / torch.tensor(cfg["std"]).view(-1, 1, 1)',
              f"tokens = model.forward_features(x)  # [1, {m.registers} registers + patches, {m.embed_dim}]",
              "pooled = model(x)  # mean of the patch tokens, registers excluded", "```", "",
              "## Provenance", ""]
    if source.get("run_id"):
        lines.append(f"- MLflow run `{source['run_id']}`" + (f" at {source['tracking_uri']}" if source.get(
            "tracking_uri") else ""))
    lines.append(f"- checkpoint `{source['checkpoint']}`")
    return "\n".join(lines) + "\n"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# --------------------------------------------------------------------------------------- MLflow
def sweep_parent(uri: str, sweep: str) -> str:
    """The newest parent run of sweep ``sweep`` in the store at ``uri``."""
    client = mlflow_client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{ROLE_TAG}` = "
                                                         f"'sweep'", order_by=["attributes.start_time DESC"],
                              max_results=1) if experiments else []
    if not runs:
        raise ExportError(f"no MLflow run of sweep {sweep!r} in {uri}")
    return runs[0].info.run_id


def best_run(runs: list, metric: str, mode: str = "max"):
    """The run with the best final ``metric`` among runs that have it and a checkpoint; ExportError if none."""
    usable = [r for r in runs if _finite(r.data.metrics.get(metric)) and r.data.tags.get(CHECKPOINT_TAG)]
    if not usable:
        raise ExportError(f"none of the {len(runs)} runs has both metric {metric!r} and a checkpoint "
                          f"(tag {CHECKPOINT_TAG})")
    return (max if mode == "max" else min)(usable, key=lambda r: r.data.metrics[metric])


def export_run(uri: str, run_id: str, out: str | Path, metric: str | None = None, mode: str = "max",
               model_name: str | None = None, register: bool = True) -> Exported:
    """Export the checkpoint of MLflow run ``run_id`` to ``out``, log it to the run and register it."""
    client = mlflow_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:  # unknown or malformed id: MLflow's words, shortened to their first line
        raise ExportError(f"no MLflow run {run_id!r} in {safe_uri(uri)}: {str(err).strip().splitlines()[0][:200]}; "
                          f"`capi sweep status NAME` lists a sweep's runs") from None
    location = run.data.tags.get(CHECKPOINT_TAG)
    if not location:
        raise ExportError(f"MLflow run {run_id} has no checkpoint (tag {CHECKPOINT_TAG}); did it finish?")
    sweep = run.data.tags.get(SWEEP_TAG)
    provenance = {
        "run_id": run_id, "run_name": run.info.run_name, "tracking_uri": safe_uri(uri), "sweep": sweep,
        "trial_id": run.data.tags.get(TRIAL_TAG), "parent_run_id": run.data.tags.get(PARENT_TAG),
        "metric": metric, "mode": mode, "value": run.data.metrics.get(metric) if metric else None,
        "swept": json.loads(run.data.tags.get(SWEPT_TAG, "[]")), "checkpoint": location,
    }
    with _local_checkpoint(location) as checkpoint:
        exported = export_checkpoint(checkpoint, out, provenance)
    result = Exported(out=exported, run_id=run_id, metric=metric, value=provenance["value"])
    if register:
        client.log_artifacts(run_id, str(exported), ARTIFACT_DIR)
        result.model_name = model_name or f"capi-{sweep or run.info.run_name}"
        result.version = register_export(client, result.model_name, run_id, f"{run.info.artifact_uri}/{ARTIFACT_DIR}")
    return result


def register_export(client, name: str, run_id: str, source: str) -> str:
    """A new version of registered model ``name`` from the export at ``source``, aliased champion."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="CAPI-pretrained ViT encoders (timm safetensors)")
    version = client.create_model_version(name, source=source, run_id=run_id,
                                          description="model.safetensors + config.json + README.md (timm)")
    client.set_registered_model_alias(name, ALIAS, version.version)
    return str(version.version)


def export_best(uri: str, parent_run_id: str, out: str | Path, metric: str, mode: str = "max",
                model_name: str | None = None, register: bool = True) -> Exported:
    """Export the best child run of a sweep's parent run."""
    run = best_run(child_runs(uri, parent_run_id), metric, mode)
    return export_run(uri, run.info.run_id, out, metric, mode, model_name, register)


class _local_checkpoint:
    """A local directory with the checkpoint at ``location``: itself, or a download of a remote URI."""

    def __init__(self, location: str):
        self.location = location
        self._tmp: str | None = None

    def __enter__(self) -> Path:
        if "://" not in self.location:
            path = Path(self.location)
            if not path.is_dir():
                raise ExportError(f"checkpoint {path} does not exist (moved or pruned?)")
            return path
        self._tmp = tempfile.mkdtemp(prefix="capi-export-")
        fs, root = pyarrow.fs.FileSystem.from_uri(self.location)
        pyarrow.fs.copy_files(root, os.path.join(self._tmp, "ckpt"), source_filesystem=fs)
        return Path(self._tmp) / "ckpt"

    def __exit__(self, *exc) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
