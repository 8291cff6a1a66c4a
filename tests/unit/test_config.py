"""Config: YAML + environment overrides, unknown keys rejected by name, absolute state paths, secrets masked
when shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from genloop.services.config import ConfigError, GenloopConfig, load_config, load_train_settings, mask_url


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


def test_a_settings_file_is_a_train_section_over_the_config(tmp_path: Path):
    base = GenloopConfig(train={"max_steps": 7}).train
    tuned = load_train_settings(write(tmp_path, "train:\n  learning_rate: 0.002\n  preset: small\n"), base)
    assert (tuned.learning_rate, tuned.preset, tuned.max_steps) == (0.002, "small", 7)
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size: Input should be greater"):
        load_train_settings(write(tmp_path, "train:\n  micro_batch_size: 0\n"), base)
    with pytest.raises(ConfigError, match="one mapping, `train:`"):
        load_train_settings(write(tmp_path, "gate:\n  max_regression: 0.1\n"), base)
    with pytest.raises(ConfigError, match="cannot read it"):
        load_train_settings(tmp_path / "absent.yaml", base)


def test_the_tuning_space_refuses_what_training_would(tmp_path: Path):
    # A trial's settings are copied from these values unvalidated: a bad one must stop the config.
    for key, value in (("weight_decays", "[-0.1]"), ("warmup_fractions", "[1.5]"), ("micro_batch_sizes", "[0]"),
                       ("learning_rate_range", "[3, 1]")):
        with pytest.raises(ConfigError, match=rf"tuning\.{key}"):
            load_config(write(tmp_path, f"tuning:\n  {key}: {value}\n"))


def test_home_is_absolute_for_ray_workers(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = GenloopConfig(home=Path("relative/state"))
    assert config.home == tmp_path / "relative" / "state"
    assert config.home.is_absolute()


@pytest.mark.parametrize("expression, weekdays", [
    ("30 4 * * 1", "mon"),  # APScheduler alone would read 1 as Tuesday
    ("0 3 * * 0", "sun"), ("0 3 * * 7", "sun"),
    ("0 3 * * */2", "sun,tue,thu,sat"),
    ("0 3 * * 1-5/2", "mon,wed,fri"),
    ("0 3 * * 0-6", "sun,mon,tue,wed,thu,fri,sat"),
    ("0 3 * * Mon-Fri", "mon,tue,wed,thu,fri"),
    ("0 3 * * *", "*"),
])
def test_retrain_cron_reads_weekdays_as_crontab_does(expression, weekdays):
    from genloop.services.schedule import cron_trigger

    assert f"day_of_week='{weekdays}'" in str(cron_trigger(expression))


@pytest.mark.parametrize("expression, message", [
    ("0 3 * *", "5 fields"), ("0 3 1 * 1", "not both"), ("0 3 * * 9", "0-7"), ("0 3 * * 5-1", "valid range"),
    ("61 3 * * *", "maximum value"),
])
def test_bad_retrain_cron_is_a_config_error_naming_the_problem(tmp_path, expression, message):
    file = tmp_path / "genloop.yaml"
    file.write_text(f"scheduler:\n  retrain_cron: '{expression}'\n")
    with pytest.raises(ConfigError, match=message):
        load_config(file)


@pytest.mark.parametrize(("serving", "gpus"), [
    ({}, 0.0),
    ({"device": "cuda"}, 1.0),
    ({"device": "cuda:1"}, 1.0),
    ({"engine": "vllm"}, 1.0),
    ({"engine": "vllm", "replica_gpus": 0.5}, 0.5),  # two replicas share one GPU during a rollout
    ({"replica_gpus": 0}, 0.0),
])
def test_gpu_replicas_reserve_a_gpu_unless_told_otherwise(serving, gpus):
    assert GenloopConfig(serving=serving).serving.gpus_per_replica == gpus


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://genloop:s3cret@db:5432/state", "postgresql://genloop:***@db:5432/state"),
    ("postgresql://u:p%40ss@h/db?sslmode=require&password=x", "postgresql://u:***@h/db?sslmode=require&password=***"),
    ("https://bob:pw@mlflow.example/?api_key=k&experiment=3", "https://bob:***@mlflow.example/?api_key=***&experiment=3"),
    ("s3://bucket/a.bin?X-Amz-Credential=c&X-Amz-Signature=s", "s3://bucket/a.bin?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("mysql://genloop@db/state", "mysql://genloop@db/state"),  # a user name alone is no secret
    ("sqlite:////var/lib/genloop/genloop.db", "sqlite:////var/lib/genloop/genloop.db"),
    ("ray://head:10001", "ray://head:10001"),
    ("http://[::1", "http://[::1"),  # not a URL: unchanged, not an error
])
def test_urls_are_shown_without_their_secrets(url, shown):
    assert mask_url(url) == shown


def test_autoscaling_reads_from_yaml_and_refuses_inverted_bounds(tmp_path: Path):
    config = load_config(write(tmp_path, "serving:\n  autoscaling:\n    max_replicas: 4\n"
                                          "    target_ongoing_requests: 3\n"))
    options = config.serving.deployment().autoscaling
    assert options is not None and (options.min_replicas, options.max_replicas, options.target_ongoing_requests) \
        == (1, 4, 3)
    assert GenloopConfig().serving.deployment().autoscaling is None  # fixed replicas unless asked
    with pytest.raises(ConfigError, match=r"max_replicas \(1\) is below min_replicas \(2\)"):
        load_config(write(tmp_path, "serving:\n  autoscaling:\n    min_replicas: 2\n    max_replicas: 1\n"))
    with pytest.raises(ConfigError, match=r"serving\.autoscaling\.max_replica: unknown key"):
        load_config(write(tmp_path, "serving:\n  autoscaling:\n    max_replica: 4\n"))


def test_storage_locations_default_under_home_and_take_uris(tmp_path: Path):
    config = GenloopConfig(home=tmp_path)
    assert config.datasets_dir == str(tmp_path / "datasets")
    assert config.inference_log_dir == str(tmp_path / "inference-log")
    config = load_config(write(tmp_path, "datasets_uri: s3://bucket/ds\ninference_log_uri: s3://bucket/log\n"
                                          "tracking:\n  artifact_location: s3://bucket/mlflow\n"))
    assert (config.datasets_dir, config.inference_log_dir) == ("s3://bucket/ds", "s3://bucket/log")


def test_max_replicas_per_node_reaches_the_deployment(tmp_path: Path):
    config = load_config(write(tmp_path, "serving:\n  num_replicas: 2\n  max_replicas_per_node: 1\n"))
    assert config.serving.deployment().max_replicas_per_node == 1
    assert GenloopConfig().serving.deployment().max_replicas_per_node is None  # Serve's own spreading
    with pytest.raises(ConfigError, match=r"serving\.max_replicas_per_node"):
        load_config(write(tmp_path, "serving:\n  max_replicas_per_node: 0\n"))
