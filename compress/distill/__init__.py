"""Distillation: flow-matching recovery of a pruned student from its server teacher (task-progressive, DreamLite),
reward fine-tuning (GRPO) of a flow model or server, and step distillation to K steps with guidance distilled in."""
from .features import PROJECTIONS, FeatureProjector, matching_blocks
from .flow import EpsilonToFlow, flow_noise, flow_velocity, sample_sigmas
from .recover import FlowView, LossWeights, Phase, RecoverTask, recover, recover_batch, saved_projector
from .rl import RLSettings, reward_tune
from .steps import StepSettings, step_distill

__all__ = ["EpsilonToFlow", "FeatureProjector", "FlowView", "LossWeights", "PROJECTIONS", "Phase", "RecoverTask",
           "flow_noise", "flow_velocity", "matching_blocks", "recover", "recover_batch", "sample_sigmas",
           "saved_projector", "RLSettings", "reward_tune", "StepSettings", "step_distill"]
