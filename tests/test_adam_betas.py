"""AdamW's betas: a recipe's `adam_betas` reaches the optimizer of the training loop."""

import pytest
import torch
from torch import nn

from zoo.recipe import load_recipe
from zoo.reference import teacher_lora_folder
from zoo.transfer.loop import LoopConfig, lr_schedule, train_loop


class _Point(nn.Module):
    def __init__(self):
        super().__init__()
        self.x = nn.Parameter(torch.tensor([3.0, -2.0, 0.5]))


def _trained(betas, tmp_path) -> torch.Tensor:
    """x after 12 steps of the loop on a quadratic whose gradient changes scale (so beta2 matters)."""
    model = _Point()
    blocks = torch.zeros(12, 4, dtype=torch.long)
    cfg = LoopConfig(
        name="stage1",
        tokens=12 * 4,
        batch_size=1,
        lr=0.1,
        grad_clip=0.0,
        adam_betas=list(betas),
        checkpoint_every=0,
        log_every=100,
    )
    train_loop(model, blocks, cfg, lambda batch: ((model.x**4).sum(), {}), tmp_path)
    return model.x.detach()


def _by_hand(betas) -> torch.Tensor:
    x = nn.Parameter(torch.tensor([3.0, -2.0, 0.5]))
    opt = torch.optim.AdamW([x], lr=0.1, betas=betas, weight_decay=0.0)
    lr_at = lr_schedule("constant", 0.1, 12)
    for step in range(12):
        opt.zero_grad()
        (x**4).sum().backward()
        opt.param_groups[0]["lr"] = lr_at(step)
        opt.step()
    return x.detach()


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.6)])
def test_the_loop_steps_adamw_with_the_configured_betas(betas, tmp_path):
    torch.testing.assert_close(_trained(betas, tmp_path), _by_hand(betas))


def test_other_betas_give_another_result(tmp_path):
    assert not torch.allclose(_trained((0.5, 0.6), tmp_path / "a"), _trained((0.9, 0.999), tmp_path / "b"))


def test_a_recipes_adam_betas_reach_each_stages_loop():
    recipe = load_recipe("recipes/smollm2-135m/lolcats.yaml", ["stage1.adam_betas=[0.8,0.95]"])
    assert recipe.stage1.loop("stage1", 0).adam_betas == [0.8, 0.95]
    assert recipe.stage2.loop("stage2", 0).adam_betas == [0.9, 0.999]  # AdamW's own default


def test_stage2_betas_give_the_fair_reference_its_own_cache_folder():
    """The reference is the teacher fine-tuned with stage 2's optimizer: other betas, another reference;
    the default leaves the key as it was before the setting existed (caches made then stay valid)."""
    recipe = load_recipe("recipes/smollm2-135m/lolcats.yaml")
    folder, key = teacher_lora_folder(recipe)
    assert "adam_betas" not in key
    assert teacher_lora_folder(recipe.override(["stage2.adam_betas=[0.9,0.999]"]))[0] == folder
    assert teacher_lora_folder(recipe.override(["stage2.adam_betas=[0.9,0.95]"]))[0] != folder
    assert teacher_lora_folder(recipe.override(["stage1.adam_betas=[0.9,0.95]"]))[0] == folder
