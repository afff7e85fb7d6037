"""Fidelity to the released code the recipes cite (issue 17; evidence in docs/recipe_audit.md).

The hand vectors are numbers read off the released DAS code on the same tensors; each test fails on the
behaviour before the fix.
"""

import inspect
import itertools
import warnings
from pathlib import Path

import pytest
import torch

from deepmetric.losses import MarginLoss, MinedTriplets, ProxyAnchorLoss
from deepmetric.miners import SemiHardMiner
from deepmetric.synthesis import IAA
from deepmetric.training.builders import build_optimizer
from deepmetric.training.config import load_config
from deepmetric.training.criterion import build_criterion
from deepmetric.training.proxy_lr import (
    PROXY_STEP_LIMIT,
    ProxyStepWarning,
    check_proxy_steps,
    proxy_step_ratio,
)
from deepmetric.training.recipes import configs_dir

CONFIGS = configs_dir()


def _recipes(pattern: str) -> list[Path]:
    paths = sorted(CONFIGS.glob(pattern))
    assert paths, f"no recipe matches {pattern}"
    return paths


def _ids(paths: list[Path]) -> list[str]:
    return [p.relative_to(CONFIGS).as_posix() for p in paths]


# ------------------------------------------------------------------------------------ item 2: margin divisor --
def _das_margin_vector():
    """Three triplets with (D_ap, D_an) = (1.1, 1.3), (0.8, 1.2), (0.5, 1.5), β 1.2, m 0.2: ℓ⁺ = (0.1, 0, 0),
    ℓ⁻ = (0.1, 0.2, 0), Σ = 0.4 over 3 non-zero terms in 2 active triplets."""
    x = torch.tensor([[0.0], [1.1], [1.3], [0.0], [0.8], [1.2], [0.0], [0.5], [1.5]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 0, 0, 1, 0, 0, 1])
    t = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    return x, y, MinedTriplets(t[:, 0], t[:, 1], t[:, 2])


def test_margin_active_triplets_reproduces_the_das_divisor():
    x, y, mined = _das_margin_vector()
    das = MarginLoss(0.2, beta=1.2, num_classes=2, normalize_embeddings=False, reduction="active_triplets").double()
    pml = MarginLoss(0.2, beta=1.2, num_classes=2, normalize_embeddings=False).double()
    assert float(das(x, y, mined=mined).detach()) == pytest.approx(0.2, abs=1e-6)  # DAS loss/margin.py: 0.4 / 2 triplets
    assert float(pml(x, y, mined=mined).detach()) == pytest.approx(0.4 / 3, abs=1e-6)  # PML: 0.4 / 3 terms (the default)


def test_margin_active_triplets_with_no_active_term_is_zero():
    x = torch.tensor([[0.0], [1.0], [1.6]], dtype=torch.float64, requires_grad=True)  # ℓ⁺ = ℓ⁻ = 0
    y = torch.tensor([0, 0, 1])
    loss = MarginLoss(0.2, beta=1.2, normalize_embeddings=False, reduction="active_triplets").double()
    value = loss(x, y, mined=MinedTriplets(torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    assert float(value.detach()) == 0.0
    value.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("reduction", ["avg_nonzero", "active_triplets"])
def test_margin_all_triplets_dense_equals_brute_force(reduction: str):
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(14, 5, generator=g, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4])
    loss = MarginLoss(0.2, beta=1.1, num_classes=5, reduction=reduction).double()
    with torch.no_grad():
        loss.beta.copy_(torch.tensor([0.9, 1.0, 1.1, 1.2, 1.3], dtype=torch.float64))
    d = torch.cdist(x, x)
    total, terms, active = 0.0, 0, 0
    for a, p, n in itertools.product(range(14), repeat=3):
        if a == p or y[a] != y[p] or y[a] == y[n]:
            continue
        b = float(loss.beta[y[a]].detach())
        lp, ln = max(0.0, float(d[a, p]) - b + 0.2), max(0.0, b - float(d[a, n]) + 0.2)
        total += lp + ln
        terms += (lp > 0) + (ln > 0)
        active += (lp > 0) or (ln > 0)
    assert 0 < active < terms  # the two divisors really differ on this batch
    expected = total / (terms if reduction == "avg_nonzero" else active)
    assert float(loss(x, y).detach()) == pytest.approx(expected, rel=1e-9)


def test_margin_rejects_an_unknown_reduction():
    with pytest.raises(ValueError, match="MarginLoss.reduction must be one of avg_nonzero, active_triplets"):
        MarginLoss(reduction="mean")


DAS_MARGIN = _recipes("*/das_t2_margin_*.yaml") + [CONFIGS / "cub200/margin_dws_bninception.yaml"]


@pytest.mark.parametrize("path", DAS_MARGIN, ids=_ids(DAS_MARGIN))
def test_das_and_ms_margin_recipes_divide_by_active_triplets(path: Path):
    criterion = build_criterion(load_config(path), num_classes=100)
    (margin,) = [m for m in criterion.modules() if isinstance(m, MarginLoss)]
    assert margin.reduction == "active_triplets"


def test_reality_check_margin_keeps_the_pml_divisor_and_one_shared_beta():
    criterion = build_criterion(load_config(CONFIGS / "reality_check/cub200_margin.yaml"), num_classes=75)
    (margin,) = [m for m in criterion.modules() if isinstance(m, MarginLoss)]
    assert margin.reduction == "avg_nonzero"
    assert margin.beta.numel() == 1  # mlrc.md's "Margin" row (shared β), not "Margin / class"


# ------------------------------------------------------------------------------------ item 3: semi-hard window --
def _semihard_candidates(**kwargs) -> set[int]:
    """Negatives the miner picks for anchor 0 (its only positive is row 1) over many seeds. 1-d points: anchor
    0.0, positive 0.6, negatives 0.65 … 0.85, plus far points that give every class a partner."""
    x = torch.tensor([[0.0], [0.6], [0.65], [0.7], [0.75], [0.79], [0.85], [5.0], [5.1], [5.2], [5.3], [5.4]],
                     dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
    picked = set()
    for seed in range(200):
        t = SemiHardMiner(margin=0.2, normalize_embeddings=False, seed=seed, **kwargs)(x, y)
        picked.add(int(t.negative[(t.anchor == 0).nonzero()[0, 0]]))
    return picked


def test_semi_hard_default_window_is_on_plain_distances_as_das():
    assert _semihard_candidates() == {2, 3, 4, 5}  # DAS sampling/semihard.py: 0.6 < D_an < 0.8
    assert _semihard_candidates(squared=True) == {2, 3}  # on D²: 0.36 < D_an² < 0.56


DAS_SEMIHARD = _recipes("*/das_t2_triplet_semihard_*.yaml") + [CONFIGS / "cub200/triplet_semihard_bninception.yaml"]


@pytest.mark.parametrize("path", DAS_SEMIHARD, ids=_ids(DAS_SEMIHARD))
def test_das_semihard_recipes_window_on_plain_and_loss_on_squared_distances(path: Path):
    cfg = load_config(path)
    assert cfg.loss.miner == "semi_hard" and cfg.loss.miner_params["squared"] is False  # explicit, not the default
    assert cfg.loss.params["squared"] is True  # DAS loss/triplet.py: [‖a−p‖² − ‖a−n‖² + 0.2]₊


# ------------------------------------------------------------------------------------ item 1: IAA estimator --
IAA_RECIPES = [p for p in _recipes("**/*iaa*.yaml") if load_config(p).synthesis.name == "iaa"]


def test_every_iaa_synthesis_recipe_is_checked():
    assert len(IAA_RECIPES) == 12


@pytest.mark.parametrize("path", IAA_RECIPES, ids=_ids(IAA_RECIPES))
def test_iaa_recipes_use_the_released_code_settings(path: Path):
    """One source of truth: every key of IAA.legacy_kwargs() (running estimator update with momentum 0.2, …)
    resolves to the same value in the recipe, whether it spells the key out or inherits the default."""
    params = load_config(path).synthesis.params
    defaults = {k: v.default for k, v in inspect.signature(IAA.__init__).parameters.items()}
    resolved = {key: params.get(key, defaults[key]) for key in IAA.legacy_kwargs()}
    assert resolved == IAA.legacy_kwargs()


# ------------------------------------------------------------------------------------ pure recipe fixes --
def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


RECIPE_FACTS = [
    # Proxy-Anchor: γ/β train after the warm-up (train.py:285-287), statistics stay frozen
    *[(f"{d}/proxy_anchor{s}_bninception.yaml", "model.bn_policy", "freeze_stats")
      for d in ("cub200", "cars196") for s in ("", "_sgar")],
    # Reality Check ProxyNCA proxy lr (mlrc.md) over the base lr 1e-6
    ("reality_check/cub200_proxy_nca.yaml", "optimizer.loss_lr_multiplier", 6040.0),
    ("reality_check/cars196_proxy_nca.yaml", "optimizer.loss_lr_multiplier", 4430.0),
    ("reality_check/sop_proxy_nca.yaml", "optimizer.loss_lr_multiplier", 528.0),
    # IAA on SOP with GoogLeNet: min(⌊59551/180⌋, 300) = 300 iterations per code epoch
    *[(f"sop/{n}.yaml", "data.batches_per_epoch", 300) for n in (
        "ms_iaa_googlenet", "contrastive_iaa_googlenet", "ms_googlenet_iaa_baseline", "contrastive_googlenet_iaa_baseline")],
    # DAS lifted / N-pair: e_recall on raw features with an L2 index
    *[(f"{d}/das_t2_{loss}{das}_resnet50.yaml", "evaluation.distance", "euclidean")
      for d in ("cub200", "cars196", "sop") for loss in ("generalized_lifted", "npair") for das in ("", "_das")],
    # Reality Check MS + miner: PML MeanReducer over every anchor row
    *[(f"reality_check/{d}_ms{m}.yaml", "loss.params.reduction", "batch")
      for d in ("cub200", "cars196", "sop") for m in ("", "_miner")],
    # XBM trainer keeps the best MAP@R; LAST_STRIDE 2 in its config defaults
    ("cub200/xbm_contrastive_bninception.yaml", "evaluation.selection_metric", "map@r"),
    ("sop/xbm_contrastive_resnet50.yaml", "evaluation.selection_metric", "map@r"),
    ("sop/xbm_contrastive_resnet50.yaml", "model.last_stride_one", False),
    # Deep_metric train.py never passes hard_mining to the Weight loss
    ("cub200/weight_bninception.yaml", "loss.params.mining", False),
]


@pytest.mark.parametrize("recipe,key,expected", RECIPE_FACTS, ids=[f"{r}:{k}" for r, k, _ in RECIPE_FACTS])
def test_recipe_reproduces_the_released_code(recipe: str, key: str, expected):
    assert _get(load_config(CONFIGS / recipe), key) == expected


# ------------------------------------------------------------------------------------ item 5: proxy lr --
def _groups(loss: ProxyAnchorLoss, lr: float) -> list[dict]:
    return [{"params": [loss.proxies], "lr": lr}]


def test_proxy_step_warning_fires_for_adam_1e3_x100_on_kanji_sized_proxies():
    torch.manual_seed(0)
    loss = ProxyAnchorLoss(783, 128)
    with pytest.warns(ProxyStepWarning, match=r"ProxyAnchorLoss: one adam step .* ≈1\.9\d× its norm"):
        ratios = check_proxy_steps("adam", _groups(loss, 1e-3 * 100), loss)
    assert ratios["ProxyAnchorLoss"] == pytest.approx((783 / 2) ** 0.5 * 0.1, rel=0.03)  # lr·√(C/2) ≈ 1.98


def test_proxy_step_warning_is_silent_for_the_paper_setting():
    torch.manual_seed(0)
    loss = ProxyAnchorLoss(100, 512)  # CUB: AdamW lr 1e-4 × 100
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProxyStepWarning)
        ratios = check_proxy_steps("adamw", _groups(loss, 1e-2), loss)
    assert ratios["ProxyAnchorLoss"] == pytest.approx(0.01 * 50 ** 0.5, rel=0.03)  # ≈ 0.07
    assert ratios["ProxyAnchorLoss"] < PROXY_STEP_LIMIT


def test_predicted_proxy_step_is_the_real_first_adam_step():
    torch.manual_seed(0)
    loss = ProxyAnchorLoss(50, 16)
    before = loss.proxies.detach().clone()
    predicted = proxy_step_ratio("adam", 0.05, loss.proxies)
    optimizer = torch.optim.Adam([loss.proxies], lr=0.05)
    loss(torch.randn(32, 16), torch.randint(0, 50, (32,))).backward()
    optimizer.step()
    measured = float((loss.proxies.detach() - before).norm() / before.norm())
    assert measured == pytest.approx(predicted, rel=1e-3)
    assert proxy_step_ratio("sgd", 0.05, loss.proxies) is None  # SGD's step depends on the gradient


def _kanji_optimizer(overrides: list[str]):
    from deepmetric.models import build_model

    cfg = load_config(CONFIGS / "kanji_glyphs/proxy_anchor.yaml", overrides)
    criterion = build_criterion(cfg, num_classes=783)
    return build_optimizer(cfg.optimizer, build_model(cfg.model), criterion)


def test_build_optimizer_warns_for_the_x100_rule_and_not_for_the_kanji_proxy_anchor_recipe():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProxyStepWarning)
        _kanji_optimizer([])
    with pytest.warns(ProxyStepWarning):
        _kanji_optimizer(["optimizer.loss_lr_multiplier=100"])
