import pytest

from deepmetric.training.config import ConfigError, ExperimentConfig, load_config


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
