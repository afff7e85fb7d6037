"""Every recipe in configs/ loads, builds every component and runs 2 training steps on a miniature copy of
its dataset's official layout (tiny JPEGs; weights random because nothing downloads here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_layouts import make_cars, make_cub, make_inshop, make_sop

from deepmetric.training.config import load_config
from deepmetric.training.recipes import recipe_paths
from deepmetric.training.run_dir import create_run_dir
from deepmetric.training.trainer import Trainer

PER_CLASS = 3
RECIPES = recipe_paths()


@pytest.fixture(scope="module")
def dataset_roots(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    train_classes, test_classes = list(range(1, 9)), list(range(101, 104))
    cub = make_cub(root / "cub", {c: PER_CLASS for c in train_classes + test_classes})
    cars = make_cars(root / "cars", [(c, 0) for c in list(range(1, 9)) + list(range(99, 102))
                                     for _ in range(PER_CLASS)])
    sop_train = [c for c in range(1, 9) for _ in range(PER_CLASS)]
    sop_test = [c for c in range(11319, 11322) for _ in range(PER_CLASS)]
    sop = make_sop(root / "sop", sop_train, sop_test)
    rows = [(f"id_{i:08d}", "train") for i in range(1, 9) for _ in range(PER_CLASS)]
    rows += [(f"id_{i:08d}", s) for i in range(20, 23) for s in ("query", "gallery", "gallery")]
    inshop = make_inshop(root / "inshop", rows)
    return {"cub200": cub, "cars196": cars, "sop": sop, "inshop": inshop}


def test_there_are_recipes_for_every_family():
    names = {p.stem for p in RECIPES}
    assert len(RECIPES) >= 40
    for family in ("ms", "xbm", "proxy_anchor", "sgar", "mdr", "iaa", "das", "contrastive", "triplet",
                   "lifted", "binomial", "margin", "nca", "weight"):
        assert any(family in n for n in names), family


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_builds_and_runs_two_steps(path: Path, dataset_roots, tmp_path):
    base = load_config(path)
    overrides = ["model.pretrained=null", "train.device=cpu", "train.progress=false", "train.threads=1",
                 "data.num_workers=0", "data.eval_batch_size=8", "train.iterations=2",
                 "data.validation_fraction=0.25", "data.max_classes=null"]
    if base.data.dataset != "kanji_glyphs":
        overrides.append(f"data.root={dataset_roots[base.data.dataset]}")
    else:
        overrides.append("data.max_classes=12")
    # 2 classes × 2 images keep two 224-px steps of a ResNet-50 cheap on a CPU; the recipe's own sampler
    # variant, transforms, model, loss, miner, memory and synthesis are still the ones built and run.
    overrides += ["data.m_per_class=2", "data.batch_size=4"]
    if base.memory.name:
        overrides.append("memory.params.memory_size=64")
    config = load_config(path, overrides)
    trainer = Trainer(config, create_run_dir(tmp_path / "run"))
    assert isinstance(trainer.model, torch.nn.Module)
    loader = iter(trainer._loader())
    trainer._on_epoch_start(0)  # synthesis hooks (IAA estimation pass) run on the fixture too
    for _ in range(2):
        try:
            images, labels = next(loader)
        except StopIteration:  # a tiny fixture epoch can be one batch long
            loader = iter(trainer._loader())
            images, labels = next(loader)
        logs = trainer.train_step(images, labels)
        assert torch.isfinite(torch.tensor(logs["loss"])), logs
