import re

import pytest

from deepmetric.training.config import ConfigError, ExperimentConfig, check_config, load_config


def test_defaults_are_the_quickstart():
    cfg = load_config(None)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.data.dataset == "kanji_glyphs"
    assert cfg.loss.name == "multi_similarity"


def test_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)


def test_unknown_key_is_named_with_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  iterations: 5\n  iteratons: 7\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "train.iteratons" in str(info.value) and "c.yaml" in str(info.value)


def test_unknown_section_and_override(tmp_path):
    with pytest.raises(ConfigError, match="trian"):
        load_config(None, ["trian.iterations=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.iterations"])


def test_overrides_are_typed():
    cfg = load_config(None, ["train.iterations=12", "optimizer.lr=0.5", "loss.params.alpha=3",
                             "evaluation.recall_at=[1, 10]", "model.pretrained=null"])
    assert cfg.train.iterations == 12 and cfg.optimizer.lr == 0.5
    assert cfg.loss.params == {"alpha": 3}
    assert cfg.evaluation.recall_at == [1, 10]
    with pytest.raises(ConfigError, match="train.iterations"):
        load_config(None, ["train.iterations=abc"])


def test_yaml_file_round_trip(tmp_path):
    from deepmetric.training.config import save_config

    cfg = load_config(None, ["train.iterations=3", "loss.params.base=0.6"])
    path = tmp_path / "resolved.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg


def test_literal_fields_name_the_field_the_value_and_the_allowed_values():
    cases = {
        "train.amp=fp32": ("train.amp", "'fp32'", "'none', 'fp16', 'bf16'"),
        "train.protocol=test": ("train.protocol", "'test'", "'validation', 'legacy'"),
        "data.sampler=balanced": ("data.sampler", "'balanced'", "'m_per_class', 'random'"),
        "scheduler.unit=steps": ("scheduler.unit", "'steps'", "'iterations', 'epochs'"),
        "optimizer.name=lamb": ("optimizer.name", "'lamb'", "'adam', 'adamw', 'sgd', 'rmsprop'"),
        "model.pooling=token": ("model.pooling", "'token'", "'avg', 'max', 'avg+max', 'gem', 'cls'"),
        "train.loggers=[mlflow]": ("train.loggers", "'mlflow'", "'tensorboard', 'wandb'"),
    }
    for override, pieces in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(None, [override])
        assert all(piece in str(info.value) for piece in pieces), (override, str(info.value))


def test_bounds_and_rules_between_fields_are_checked_on_load(tmp_path):
    bad = {
        "train.iterations=0": "'train.iterations' must be >= 1, got 0",
        "train.epochs=0": "'train.epochs' must be >= 1, got 0",
        "data.validation_fraction=1.0": "'data.validation_fraction' must be < 1.0",
        "data.batch_size=30": "data.batch_size (30) must be a multiple of data.m_per_class (4)",
        "scheduler.name=step": "scheduler.step_size must be > 0",
        "optimizer.layer_decay=0": "'optimizer.layer_decay' must be > 0.0, got 0",
        "optimizer.layer_decay=1.5": "'optimizer.layer_decay' must be <= 1.0, got 1.5",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="data.batches_per_epoch applies to the m_per_class sampler"):
        load_config(None, ["data.sampler=random", "data.batches_per_epoch=3"])
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: fp8\n")
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(path)
    assert load_config(None, ["data.sampler=random", "data.batch_size=30"]).data.batch_size == 30


def test_check_config_covers_configs_built_in_code():
    cfg = ExperimentConfig()
    assert check_config(cfg) is cfg
    cfg.train.protocol = "test"
    with pytest.raises(ConfigError, match="train.protocol"):
        check_config(cfg)


def test_layers_own_their_sections():
    from deepmetric.data.config import DataConfig
    from deepmetric.models.config import ModelConfig

    cfg = ExperimentConfig()
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.model, ModelConfig)
    assert issubclass(ConfigError, ValueError)


def test_run_length_and_schedule_in_iterations():
    cfg = load_config(None, ["train.epochs=3", "scheduler.name=warmup_multistep", "scheduler.unit=epochs",
                             "scheduler.milestones=[1, 2]", "scheduler.warmup_iterations=1"])
    assert cfg.train.total_iterations(batches_per_epoch=7) == 21
    assert load_config(None, ["train.iterations=5"]).train.total_iterations(batches_per_epoch=7) == 5
    sched = cfg.scheduler.in_iterations(batches_per_epoch=7)
    assert (sched.unit, sched.milestones, sched.warmup_iterations) == ("iterations", [7, 14], 7)
    assert cfg.scheduler.unit == "epochs"  # the config itself is unchanged
