"""Configuration: presets build, overrides apply, bad values name their field."""

import pytest
from click.testing import CliRunner

from capi_core.config import PRESETS, ConfigError, build_config, flatten, load_config, parse_overrides
from orchestrator.cli import main


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    cfg = build_config(name)
    assert cfg.model.img_size % cfg.model.patch_size == 0


def test_overrides_are_typed_and_nested():
    cfg = build_config("cpu-demo", ["optim.lr=3e-4", "model.registers=8", "masking.strategy=block",
                                    "data.crop_scale=[0.5, 1.0]"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.registers == 8
    assert cfg.masking.strategy == "block"
    assert cfg.data.crop_scale == (0.5, 1.0)
    # the preset's other values survive an override of a sibling field
    assert cfg.model.embed_dim == PRESETS["cpu-demo"]["model"]["embed_dim"]


@pytest.mark.parametrize(("override", "field"), [
    (["model.registers=17"], "model.registers"),
    (["loss.student_temp=-1"], "loss.student_temp"),
    (["optim.lr=fast"], "optim.lr"),
    (["masking.strategy=spiral"], "masking.strategy"),
    (["optim.lrr=0.1"], "optim.lrr"),
    (["model.patch_size=5"], "model"),
    (["model.pos_embed=rope", "model.registers=6"], "model"),
    (["masking.schedule=linear"], "masking"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        build_config("cpu-demo", override)
    assert field in str(err.value)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="cpu-demo"):
        build_config("cpu-huge")


def test_train_help_names_every_preset():
    shown = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    assert all(name in shown for name in PRESETS), shown  # it once left out cpu-long


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides(["optim.lr"])


def test_override_with_a_python_yaml_tag_is_refused():
    with pytest.raises(ConfigError, match="not plain YAML"):
        parse_overrides(["run.name=!!python/object/apply:os.system ['true']"])


def test_load_config_file_with_preset_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: cpu-tiny\noptim:\n  steps: 7\n")
    cfg = load_config(f, ["model.registers=0"])
    assert cfg.optim.steps == 7 and cfg.model.registers == 0
    assert cfg.model.embed_dim == PRESETS["cpu-tiny"]["model"]["embed_dim"]


def test_flatten_gives_dotted_keys():
    flat = flatten(build_config("cpu-tiny"))
    assert flat["loss.teacher_temp"] == 0.06 and "model.registers" in flat
