"""The configuration schema: presets validate, typos and bad values fail naming the key,
and docs/configuration.md lists every key as the schema has it."""

from __future__ import annotations

import importlib.util
from dataclasses import MISSING, asdict, fields

import pytest

from noisy_student import config
from noisy_student.config import StudentConfig, TeacherConfig
from noisy_student.errors import UserError
from noisy_student.stages import train
from noisy_student.training import engine
from tests.conftest import REPO

PRESETS = sorted((REPO / "pipeline_config").glob("*.yaml"))
SMOKE = REPO / "pipeline_config" / "smoke.yaml"


def test_there_are_presets_to_check():
    # guards the parametrised test below against silently checking nothing
    assert {p.name for p in PRESETS} >= {"smoke.yaml", "fashion_mnist.yaml"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_validates(path):
    cfg = config.load(path)
    assert cfg.students and cfg.teacher.epochs > 0


def test_misspelt_key_fails_naming_its_dotted_path():
    with pytest.raises(UserError, match=r"smoke\.yaml: teacher\.epoch: unknown key"):
        config.load(SMOKE, ["teacher.epoch=3"])


def test_unknown_timm_model_fails_naming_the_model_key():
    with pytest.raises(UserError, match=r"teacher\.model: .*unknown timm model 'resnet9000'"):
        config.load(SMOKE, ["teacher.model=resnet9000"])


def test_override_of_a_list_item_changes_only_that_item():
    cfg = config.load(SMOKE, ["students.0.epochs=7"])
    assert cfg.students[0].epochs == 7
    assert cfg.students[1].epochs == 1  # the smoke preset's value, untouched


def test_override_values_are_parsed_as_yaml():
    cfg = config.load(
        SMOKE,
        ["selection.min_confidence=0.5", "teacher.pretrained=true", "evaluation.severities=[2, 4]"],
    )
    assert cfg.selection.min_confidence == 0.5
    assert cfg.teacher.pretrained is True
    assert cfg.evaluation.severities == [2, 4]


def test_override_of_a_list_item_that_does_not_exist_fails():
    with pytest.raises(UserError, match=r"--set students\.5\.epochs: no list item students\.5"):
        config.load(SMOKE, ["students.5.epochs=1"])


@pytest.mark.parametrize(
    "override, section", [("name.x=1", "name"), ("teacher.model.depth=3", "teacher.model")]
)
def test_override_below_a_plain_value_fails_naming_the_value(override, section):
    with pytest.raises(UserError, match=rf"--set .*: {section} is a value, not a section"):
        config.load(SMOKE, [override])


def test_overrides_as_a_mapping_change_a_validated_config():
    # the shape of a deployment's `overrides` parameter
    base = config.load(SMOKE)
    cfg = config.resolve(base, {"students.0.epochs": 7, "selection.labels": "hard"})
    assert cfg.students[0].epochs == 7 and cfg.selection.labels == "hard"
    assert config.resolve(base, {}) is base


def test_override_without_equals_sign_fails():
    with pytest.raises(UserError, match="expected key.path=value"):
        config.load(SMOKE, ["teacher.epochs"])


def test_unknown_corruption_is_rejected():
    with pytest.raises(UserError, match=r"evaluation\.corruptions: .*unknown corruption 'smog'"):
        config.load(SMOKE, ["evaluation.corruptions=[gaussian_noise, smog]"])


def test_severity_outside_one_to_five_is_rejected():
    with pytest.raises(UserError, match=r"evaluation\.severities: .*severity 6 outside 1\.\.5"):
        config.load(SMOKE, ["evaluation.severities=[1, 6]"])


def test_out_of_range_number_fails_naming_the_key():
    with pytest.raises(UserError, match=r"selection\.min_confidence: .*less than or equal to 1"):
        config.load(SMOKE, ["selection.min_confidence=1.5"])


def test_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")


def test_invalid_yaml_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(UserError, match=r"bad\.yaml: not valid YAML"):
        config.load(bad)


def test_missing_required_section_is_named(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text(SMOKE.read_text().replace("teacher:", "teachr:"))
    # both the typo and the now-missing section are reported, the first one by name
    with pytest.raises(
        UserError,
        match=r"partial\.yaml: (teacher: Field required|teachr: unknown"
        r" key) \(and 1 more\)",
    ):
        config.load(path)


def load_reference_generator():
    spec = importlib.util.spec_from_file_location(
        "generate_config_reference", REPO / "docs" / "generate_config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_matches_the_schema():
    generator = load_reference_generator()
    page = (REPO / "docs" / "configuration.md").read_text()
    assert generator.current_table(page).strip() == generator.reference_markdown().strip(), (
        "docs/configuration.md is stale: regenerate it with "
        "`uv run python docs/generate_config_reference.py`"
    )


def test_configuration_page_lists_every_key_of_the_schema():
    # guards the comparison above against a generator that skips keys
    table = load_reference_generator().reference_markdown()
    for key in ("name", "data.root", "teacher.stem", "students[].rand_augment.magnitude"):
        assert f"| `{key}` |" in table
    assert "| `students[].unlabelled_ratio` | float | `3.0` |" in table


ENGINE_SETTINGS = {f.name for kind in (engine.Schedule, engine.Noise) for f in fields(kind)}


def test_every_training_setting_is_read_by_the_engine_or_named_as_read_elsewhere():
    """A new field of TrainConfig fails here until the engine reads it (a field of Schedule
    or Noise, passed through by name) or stages.train says who does."""
    elsewhere = set(train.NOT_THE_ENGINES)
    for schema in (TeacherConfig, StudentConfig):
        assert set(schema.model_fields) - ENGINE_SETTINGS - elsewhere == set(), schema.__name__
    assert elsewhere <= set(StudentConfig.model_fields)  # no stale entry
    assert not ENGINE_SETTINGS & elsewhere
    # every engine setting is a config field; only the teacher's loss settings are fixed
    assert set(StudentConfig.model_fields) >= ENGINE_SETTINGS
    assert ENGINE_SETTINGS - set(TeacherConfig.model_fields) == set(train.TEACHER_SCHEDULE)


def test_the_engine_keeps_no_training_default_of_its_own():
    for kind in (engine.Schedule, engine.Noise):
        for f in fields(kind):
            assert f.default is MISSING and f.default_factory is MISSING, (
                f"{kind.__name__}.{f.name}"
            )


def test_each_training_setting_reaches_the_engine_as_configured():
    cfg = StudentConfig(
        model="test_resnet",
        epochs=7,
        batch_size=5,
        lr=0.3,
        weight_decay=1e-3,
        lr_schedule="step",
        lr_decay_epochs=1.5,
        lr_decay_rate=0.5,
        warmup_epochs=0.25,
        weight_averaging="swa",
        ema_decay=0.9,
        swa_start=0.5,
        loss="distillation",
        distillation_temperature=2.0,
        unlabelled_ratio=4.0,
        eval_every=3,
        precision="fp32",
        hflip=False,
        crop_padding=4,
        cutout=0.25,
    )
    given = asdict(train.schedule(cfg)) | asdict(train.noise(cfg, 28, 28))
    assert given.pop("rand_augment") == asdict(cfg.rand_augment.for_image(28, 28))
    assert given == {name: getattr(cfg, name) for name in given}
    teacher = train.schedule(TeacherConfig(model="test_resnet"))
    assert {k: getattr(teacher, k) for k in train.TEACHER_SCHEDULE} == train.TEACHER_SCHEDULE
