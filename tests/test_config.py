"""Config loading, overrides and validation."""

from pathlib import Path

import pytest

from kdistill import config
from kdistill.config import Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]


def problems_of(raw) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.from_dict(raw)
    return caught.value.problems


def test_defaults_are_valid():
    assert config.validate(Config()) == []


def test_digits_file_matches_builtin_default():
    assert config.load(ROOT / "configs" / "digits.yaml").to_dict() == Config().to_dict()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")))
def test_shipped_configs_load(path):
    assert isinstance(config.load(path), Config)


def test_overrides_parse_yaml_values():
    cfg = config.load(
        None,
        [
            "distill.temperature=8",
            "student.hidden=[64, 64]",
            "train.keep_best=false",
            "train.teacher_epochs=null",
        ],
    )
    assert cfg.distill.temperature == 8.0
    assert isinstance(cfg.distill.temperature, float)
    assert cfg.student.hidden == [64, 64]
    assert cfg.train.keep_best is False
    assert cfg.train.teacher_epochs is None


def test_unknown_key_suggests_closest():
    problems = problems_of({"distill": {"temprature": 4}})
    assert len(problems) == 1
    assert "distill.temprature" in problems[0]
    assert "did you mean 'temperature'" in problems[0]


def test_unknown_section_suggests_closest():
    problems = problems_of({"studnet": {"hidden": [4]}})
    assert "did you mean 'student'" in problems[0]


def test_wrong_type_names_expected_form():
    problems = problems_of({"train": {"epochs": "ten"}, "student": {"hidden": 64}})
    assert any("train.epochs: expected an integer, got 'ten'" in p for p in problems)
    assert any("student.hidden: expected a list of integers" in p for p in problems)


def test_bool_is_not_an_integer():
    assert any("train.epochs" in p for p in problems_of({"train": {"epochs": True}}))


def test_all_impossible_values_reported_together():
    raw = {
        "distill": {"temperature": 0, "alpha": 1.5},
        "student": {"hidden": []},
        "teacher": {"dropout": 1.0},
        "train": {"epochs": 0, "batch_size": 0, "lr": -1.0, "optimizer": "adamm"},
        "eval": {"seeds": 0},
    }
    problems = problems_of(raw)
    for key in (
        "distill.temperature",
        "distill.alpha",
        "student.hidden",
        "teacher.dropout",
        "train.epochs",
        "train.batch_size",
        "train.lr",
        "train.optimizer",
        "eval.seeds",
    ):
        assert any(p.startswith(key) for p in problems), key
    assert any("did you mean 'adam'" in p for p in problems)


def test_negative_temperature_rejected():
    assert any("distill.temperature" in p for p in problems_of({"distill": {"temperature": -2}}))


def test_csv_needs_path():
    assert any("data.path" in p for p in problems_of({"data": {"name": "csv"}}))


def test_override_without_section_rejected():
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        config.load(None, ["epochs=3"])


def test_yaml_tags_do_not_run_code(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("run: !!python/object/apply:os.system ['touch hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(path)
    assert not (tmp_path / "hacked").exists()


def test_missing_file_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(None, ["student.hidden=[8]", "distill.alpha=0.5"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert config.load(path).to_dict() == cfg.to_dict()


def test_every_field_documented():
    for key, _default, doc in config.describe():
        assert doc, key


def test_exponent_without_dot_is_a_number():
    assert config.load(None, ["train.lr=1e-3"]).train.lr == 0.001


def test_infinite_value_rejected():
    problems = problems_of({"distill": {"temperature": float("inf")}})
    assert problems == ["distill.temperature: expected a finite number, got inf"]


def test_non_utf8_file_named(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        config.load(path)


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        config.load(path)


def test_partial_model_section_keeps_its_defaults():
    cfg = config.load(None, ["teacher.hidden=[64]", "student.dropout=0.1"])
    assert cfg.teacher.hidden == [64]
    assert cfg.teacher.dropout == Config().teacher.dropout
    assert cfg.teacher.input_dropout == Config().teacher.input_dropout
    assert cfg.student.hidden == Config().student.hidden
    assert cfg.student.dropout == 0.1


def test_shipped_mlp128_teacher_matches_hinton_teacher():
    hinton = config.load(ROOT / "configs" / "fashion-mnist.yaml")
    compressed = config.load(ROOT / "configs" / "fashion-mnist" / "mlp128_from_mlp1200x2.yaml")
    assert compressed.teacher == hinton.teacher
