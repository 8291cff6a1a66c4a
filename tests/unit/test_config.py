"""Config: YAML + environment overrides, unknown keys rejected by name, absolute state paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config import ConfigError, GenloopConfig, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "genloop.yaml"
    path.write_text(text)
    return path


def test_yaml_values_and_env_overrides(tmp_path: Path, monkeypatch):
    path = write(tmp_path, "train:\n  max_steps: 7\n  lora:\n    r: 4\ngate:\n  min_improvement: 0.05\n")
    monkeypatch.setenv("GENLOOP_TRAIN__MAX_STEPS", "9")
    monkeypatch.setenv("GENLOOP_HOME", str(tmp_path / "state"))
    config = load_config(path)
    assert config.train.max_steps == 9  # environment beats the file
    assert config.train.lora.r == 4 and config.gate.min_improvement == 0.05
    assert config.home == tmp_path / "state"
    assert config.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"


def test_unknown_keys_are_errors_naming_the_key(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"train\.max_stepz: unknown key"):
        load_config(write(tmp_path, "train:\n  max_stepz: 3\n"))
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        load_config(write(tmp_path, "trian:\n  max_steps: 3\n"))
    with pytest.raises(ConfigError, match=r"gate\.ceilings\.loss"):
        load_config(write(tmp_path, "gate:\n  ceilings:\n    loss: 3\n"))


def test_bad_values_and_files(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_config(write(tmp_path, "train:\n  max_steps: -1\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_home_is_absolute_for_ray_workers(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = GenloopConfig(home=Path("relative/state"))
    assert config.home == tmp_path / "relative" / "state"
    assert config.home.is_absolute()
