"""Stage kind ``reward-tune``: DreamLite's post-training RL, GRPO with the shapes judge's scores as rewards
(compress/distill/rl.py)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dreamlite.compress.distill.rl import RLSettings
from dreamlite.evaluation.shapes.world import EDIT_TYPES
from dreamlite.recipe import StageContext, stage

from .models import GenTag, ModelInput

EditType = Literal[EDIT_TYPES]


class RewardTuneStage(ModelInput, RLSettings):
    kind: Literal["reward-tune"]
    tags: list[GenTag] | None = Field(None, min_length=1, description="GenEval tags whose prompts are drawn "
                                                                       "(default: all six)")
    edit_types: list[EditType] | None = Field(None, min_length=1, description="ImgEdit types whose edits are "
                                                                               "drawn (default: all nine)")
    held_out: int = Field(4, ge=0, description="prompts per tag (and edits per type) on which the stage measures "
                                             "the mean reward of the model's own sampling, before and after "
                                             "(0: none)")
    save_dtype: Literal["fp32", "fp16"] = "fp32"


@stage(RewardTuneStage, distributed=True)
def run_reward_tune(cfg: RewardTuneStage, ctx: StageContext) -> dict:
    from dreamlite.compress.distill.rl import check_rl, mean_rewards, reward_tune
    from dreamlite.evaluation.rewards import ShapesRewards
    from dreamlite.models.bundle import load_bundle
    from dreamlite.train import check_launch

    check_launch()
    model = load_bundle(cfg.source(ctx))
    source = ShapesRewards(model.image_size, cfg.tags, cfg.edit_types)
    settings = RLSettings(**cfg.model_dump(include=set(RLSettings.model_fields)))
    check_rl(model, settings, source)  # before the held-out rewards are measured, not after
    gen_groups, edit_groups = settings.counts()
    measure = ctx.main and cfg.held_out > 0
    if measure:
        prompts, edits = source.held_out(cfg.held_out, ctx.seed)
        prompts, edits = prompts if gen_groups else [], edits if edit_groups else []
        before = mean_rewards(model, source, prompts, edits)
    summary = reward_tune(model, settings, ctx.dir / "train", source, ctx.seed, ctx.track, ctx.log)
    if not ctx.main:
        return summary
    rewards = {}
    if measure:
        after = mean_rewards(model, source, prompts, edits)
        rewards = {f"{task}_reward_{when}": round(r[task], 4) for when, r in (("before", before), ("after", after))
                   for task in r}
    if cfg.save_dtype == "fp16":
        model.unet.to(torch.float16)
    model.save_pretrained(ctx.dir / "model", stage="reward-tune", parent=model.name,
                          reward_tune={"reward": "shapes judge", "tags": list(source.tags),
                                       "edit_types": list(source.edit_types), "steps": cfg.steps,
                                       "sde_steps": cfg.sde_steps, "eta": cfg.eta, "group": cfg.group,
                                       "cfg": summary["cfg"], "image_cfg": summary["image_cfg"], "kl": cfg.kl})
    return {**summary, **rewards}
