from __future__ import annotations

import pytest
import torch
from torch import nn

from jepa_blocks.training import (
    OptimizerScheduler,
    is_no_decay,
    param_groups_for_weight_decay,
)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class TinyJEPA(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=2, stride=2)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, dim))  # 3-D, still no decay
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.level_tokens = nn.ParameterList([nn.Parameter(torch.zeros(2, dim))])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.ls = LayerScale(dim)
        # token-mixing MLP: a Linear weight whose *path* contains "token" must decay
        self.mlp_tokens = nn.Linear(dim, dim, bias=False)
        self.head = nn.Linear(dim, 2)
        self.frozen = nn.Linear(dim, dim)
        self.frozen.requires_grad_(False)


DECAYED = {"patch_embed.weight", "fc.weight", "mlp_tokens.weight", "head.weight"}
NOT_DECAYED = {
    "patch_embed.bias",
    "pos_embed",
    "mask_token",
    "level_tokens.0",
    "norm.weight",
    "norm.bias",
    "fc.bias",
    "ls.gamma",
    "head.bias",
}


def _names(model: nn.Module, params: list[torch.Tensor]) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def test_split_on_small_model():
    model = TinyJEPA()
    groups = param_groups_for_weight_decay(model, weight_decay=0.05)
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05 and decay["apply_wd"] is True
    assert no_decay["weight_decay"] == 0.0 and no_decay["apply_wd"] is False
    assert _names(model, decay["params"]) == DECAYED
    assert _names(model, no_decay["params"]) == NOT_DECAYED
    # every trainable parameter exactly once, frozen ones never
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(all_ids) == trainable
    assert id(model.frozen.weight) not in set(all_ids)


def test_named_parameters_input_equals_module_input():
    model = TinyJEPA()
    a = param_groups_for_weight_decay(model, weight_decay=0.1)
    b = param_groups_for_weight_decay(model.named_parameters(), weight_decay=0.1)
    assert [[id(p) for p in g["params"]] for g in a] == [[id(p) for p in g["params"]] for g in b]


def test_duplicates_counted_once():
    model = TinyJEPA()
    shared = nn.Linear(8, 8)
    other = nn.Sequential(shared, nn.ReLU(), shared)  # shared inside one module
    other.tied = model.fc  # and shared with the first module
    groups = param_groups_for_weight_decay(
        model, model, other, model.named_parameters(), weight_decay=0.1
    )
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params})
    expected = {id(p) for p in model.parameters() if p.requires_grad} | {
        id(p) for p in shared.parameters()
    }
    assert {id(p) for p in all_params} == expected
    # order of first appearance: model's parameters first
    assert groups[0]["params"][0] is model.patch_embed.weight


def test_custom_no_decay_names_and_leaf_matching():
    model = TinyJEPA()
    groups = param_groups_for_weight_decay(model, weight_decay=0.1, no_decay_names=("head",))
    decay, no_decay = groups
    # "head" is not matched on the path (head.weight's own name is "weight")
    assert any(p is model.head.weight for p in decay["params"])
    # without "token"/"pos_embed" in the list, multi-dim tokens are decayed
    assert _names(model, decay["params"]) >= {"mask_token", "pos_embed", "level_tokens.0"}
    assert is_no_decay("blocks.0.cls_token", torch.zeros(1, 1, 4))
    assert is_no_decay("decoder_pos_embed", torch.zeros(1, 4, 4))
    assert not is_no_decay("mixer.mlp_tokens.fc1.weight", torch.zeros(4, 4))
    assert is_no_decay("anything.scale", torch.zeros(()))


def test_only_one_group_when_other_is_empty():
    groups = param_groups_for_weight_decay(nn.Linear(3, 3, bias=False), weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["apply_wd"] is True
    groups = param_groups_for_weight_decay(nn.LayerNorm(3), weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["apply_wd"] is False


def test_groups_drive_optimizer_and_scheduler():
    model = TinyJEPA()
    opt = torch.optim.AdamW(param_groups_for_weight_decay(model, weight_decay=0.04), lr=1e-3)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))], "weight_decay": 0.04})
    sched = OptimizerScheduler(opt, total_steps=10, lr=1e-3, weight_decay=(0.04, 0.4))
    for _ in range(10):
        sched.step()
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.4, 0.0, 0.4])


def test_bad_inputs():
    model = TinyJEPA()
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups_for_weight_decay(model, weight_decay=-1.0)
    with pytest.raises(TypeError, match="weight_decay"):
        param_groups_for_weight_decay(model, weight_decay="0.1")
    with pytest.raises(TypeError, match="named_parameters"):
        param_groups_for_weight_decay(model.parameters(), weight_decay=0.1)
    with pytest.raises(TypeError, match=r"sources\[1\]"):
        param_groups_for_weight_decay(model, 3, weight_decay=0.1)
    with pytest.raises(TypeError, match="no_decay_names"):
        param_groups_for_weight_decay(model, weight_decay=0.1, no_decay_names="token")
    with pytest.raises(TypeError, match="no_decay_names"):
        param_groups_for_weight_decay(model, weight_decay=0.1, no_decay_names=("",))
    with pytest.raises(ValueError, match="sources"):
        param_groups_for_weight_decay(weight_decay=0.1)
    with pytest.raises(ValueError, match="requires_grad"):
        param_groups_for_weight_decay(model.frozen, weight_decay=0.1)


# ---------------------------------------------------------------- parity with timm


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def _split(groups) -> tuple[set[int], set[int]]:
    decay = set().union(*(_ids(g["params"]) for g in groups if g["weight_decay"] > 0))
    no_decay = set().union(*(_ids(g["params"]) for g in groups if g["weight_decay"] == 0))
    return decay, no_decay


def test_same_split_as_timm_on_a_timm_vit():
    """On a timm ViT, timm's ``param_groups_weight_decay`` with the model's own
    ``no_weight_decay()`` list splits the parameters exactly as we do."""
    timm_groups = pytest.importorskip("timm.optim").param_groups_weight_decay
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=3,
                            class_token=True, reg_tokens=2)
    ours = param_groups_for_weight_decay(vit, weight_decay=0.05)
    theirs = timm_groups(vit, weight_decay=0.05, no_weight_decay_list=vit.no_weight_decay())
    assert _split(ours) == _split(theirs)
    assert [g["weight_decay"] for g in ours] == [0.05, 0.0]


def test_where_we_differ_from_timm_on_our_blocks():
    """Why the library keeps its own function: learned input tokens of the predictor
    (``mask_tokens``, ``level_tokens``) are matrices that timm decays unless every model
    lists them, and a weight-decay ramp starting at 0 must keep its decayed group (timm
    with ``weight_decay=0`` puts every parameter in its no-decay group)."""
    timm_groups = pytest.importorskip("timm.optim").param_groups_weight_decay
    from jepa_blocks import HierarchicalPredictor

    pred = HierarchicalPredictor(grid_size=4, embed_dim=16, predictor_dim=8, depth=1, num_heads=2, num_levels=2)
    tokens = {id(p) for n, p in pred.named_parameters() if p.ndim >= 2 and "token" in n.split(".")[-1]}
    assert tokens  # the predictor has learned token matrices
    decay, no_decay = _split(param_groups_for_weight_decay(pred, weight_decay=0.05))
    timm_decay, timm_no_decay = _split(timm_groups(pred, weight_decay=0.05))
    assert tokens <= no_decay and tokens <= timm_decay
    assert decay == timm_decay - tokens and no_decay == timm_no_decay | tokens
    # A ramp that starts at 0: our decayed group stays marked for the scheduler's ramp.
    assert [g["apply_wd"] for g in param_groups_for_weight_decay(pred, weight_decay=0.0)] == [True, False]
