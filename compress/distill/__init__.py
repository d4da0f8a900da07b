"""Distillation: flow-matching recovery of a pruned student from its server teacher (task-progressive, DreamLite),
and step distillation of the recovered student to K steps with guidance distilled in."""
from .features import PROJECTIONS, FeatureProjector, matching_blocks
from .flow import EpsilonToFlow, flow_noise, flow_velocity, sample_sigmas
from .recover import FlowView, LossWeights, Phase, RecoverTask, recover, recover_batch, saved_projector
from .steps import StepSettings, step_distill

__all__ = ["EpsilonToFlow", "FeatureProjector", "FlowView", "LossWeights", "PROJECTIONS", "Phase", "RecoverTask",
           "flow_noise", "flow_velocity", "matching_blocks", "recover", "recover_batch", "sample_sigmas",
           "saved_projector", "StepSettings", "step_distill"]
