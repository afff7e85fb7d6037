"""Every recipe YAML is schema-valid and names only registered components; the recipes CLI lists them."""

import json
from pathlib import Path

import pytest

from deepmetric.cli import main
from deepmetric.training.config import load_config
from deepmetric.training.recipes import configs_dir, find_recipe, list_recipes, recipe_paths

RECIPES = recipe_paths()


def _ids(paths):
    return [p.relative_to(configs_dir()).as_posix() for p in paths]


def test_recipe_folder_has_every_family():
    names = set(_ids(RECIPES))
    expected = [
        "quickstart.yaml", "cub200/weight_bninception.yaml", "cub200/contrastive_bninception.yaml",
        "cub200/binomial_bninception.yaml", "cub200/lifted_bninception.yaml", "cub200/nca_bninception.yaml",
        "cub200/margin_dws_bninception.yaml", "cub200/triplet_semihard_bninception.yaml",
        "cub200/ms_bninception.yaml", "cub200/xbm_contrastive_bninception.yaml", "sop/xbm_contrastive_resnet50.yaml",
        "cub200/proxy_anchor_bninception.yaml", "cub200/proxy_anchor_sgar_bninception.yaml",
        "cub200/mdr_bninception.yaml", "cub200/ms_iaa_googlenet.yaml", "cub200/contrastive_iaa_googlenet.yaml",
        "cub200/das_t1_ms_bninception.yaml", "cub200/das_t1_ms_das_bninception.yaml",
        "cub200/das_t2_ms_resnet50.yaml", "cub200/das_t2_ms_das_resnet50.yaml",
        "reality_check/cub200_contrastive.yaml",
    ]
    missing = [e for e in expected if e not in names]
    assert not missing, f"missing recipes: {missing}"


def test_quickstart_equals_the_defaults():
    assert load_config(configs_dir() / "quickstart.yaml") == load_config(None)


@pytest.mark.parametrize("path", RECIPES, ids=_ids(RECIPES))
def test_recipe_is_valid_and_uses_registered_components(path: Path):
    cfg = load_config(path)  # unknown keys / wrong types raise ConfigError naming the key
    from deepmetric.data.transforms import TRANSFORMS
    from deepmetric.losses import LOSSES
    from deepmetric.miners import MINERS
    from deepmetric.models.backbones import BACKBONES
    from deepmetric.synthesis import SYNTHESIS

    assert cfg.loss.name in LOSSES, f"{path}: loss {cfg.loss.name!r} not in LOSSES"
    if cfg.loss.miner is not None:
        assert cfg.loss.miner in MINERS, f"{path}: miner {cfg.loss.miner!r} not in MINERS"
    if cfg.synthesis.name is not None:
        assert cfg.synthesis.name in SYNTHESIS, f"{path}: synthesis {cfg.synthesis.name!r} not in SYNTHESIS"
    assert cfg.model.backbone in BACKBONES or cfg.model.backbone.startswith("timm:"), f"{path}: backbone unknown"
    if cfg.data.dataset != "kanji_glyphs":  # the kanji transforms register themselves from data/kanji.py
        for tf in (cfg.data.train_transform, cfg.data.eval_transform):
            assert tf in TRANSFORMS, f"{path}: transform preset {tf!r} not in TRANSFORMS"
        from deepmetric.data.datasets import DATASETS

        assert cfg.data.dataset in DATASETS
    assert cfg.train.protocol in ("validation", "legacy")
    if cfg.data.dataset != "kanji_glyphs":
        rep = cfg.reported
        assert {"paper", "table", "metrics"} <= set(rep), f"{path}: reported needs paper, table, metrics"
        assert all(isinstance(v, (int, float)) for v in rep["metrics"].values())
    # iteration-based schedules must fit in the run
    assert all(0 < m < cfg.train.iterations for m in cfg.scheduler.milestones)
    assert cfg.train.frozen_backbone_iterations < cfg.train.iterations
    # constructor parameters must exist on the registered classes (catches typos the schema cannot see)
    import inspect

    def accepted(cls):
        return set(inspect.signature(cls).parameters)

    assert set(cfg.loss.params) <= accepted(LOSSES[cfg.loss.name]), f"{path}: bad loss.params"
    if cfg.loss.miner:
        assert set(cfg.loss.miner_params) <= accepted(MINERS[cfg.loss.miner]), f"{path}: bad loss.miner_params"
    if cfg.synthesis.name:
        assert set(cfg.synthesis.params) <= accepted(SYNTHESIS[cfg.synthesis.name]), f"{path}: bad synthesis.params"
    if cfg.memory.name is not None:
        from deepmetric.memory import MEMORIES

        assert cfg.memory.name in MEMORIES, f"{path}: memory {cfg.memory.name!r} not in MEMORIES"
        assert set(cfg.memory.params) <= accepted(MEMORIES[cfg.memory.name]), f"{path}: bad memory.params"


def test_legacy_only_where_reproducing_published_numbers():
    for path in RECIPES:
        cfg = load_config(path)
        rel = path.relative_to(configs_dir()).as_posix()
        if rel.startswith("reality_check/") or rel == "quickstart.yaml":
            assert cfg.train.protocol == "validation", rel
            assert cfg.evaluation.selection_metric == "map@r" or rel == "quickstart.yaml"
        elif cfg.train.protocol == "legacy":
            assert cfg.data.validation_fraction == 0.0, rel


def test_recipes_cli_lists_and_shows(capsys):
    assert main(["recipes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(RECIPES)
    ms = next(r for r in rows if r["name"] == "cub200/ms_bninception")
    assert ms["loss"] == "multi_similarity" and ms["backbone"] == "bninception"
    assert ms["reported_recall@1"] == pytest.approx(65.7)
    assert main(["recipes"]) == 0
    table = capsys.readouterr().out
    assert "cub200/ms_bninception" in table and "65.70" in table
    assert main(["recipes", "show", "cub200/ms_bninception"]) == 0
    assert "multi_similarity" in capsys.readouterr().out
    assert main(["recipes", "show", "no/such_recipe"]) == 2
    assert "unknown recipe" in capsys.readouterr().err


def test_configs_dir_env_override(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text("name: a\n")
    monkeypatch.setenv("DEEPMETRIC_CONFIGS", str(tmp_path))
    assert configs_dir() == tmp_path
    assert [r.name for r in list_recipes()] == ["a"]
    assert find_recipe("a") == tmp_path / "a.yaml"
