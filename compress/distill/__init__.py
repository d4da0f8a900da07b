"""Distillation: flow-matching recovery of a pruned student from its server teacher (task-progressive, DreamLite)."""
from .features import PROJECTIONS, FeatureProjector, matching_blocks
from .flow import EpsilonToFlow, flow_noise, flow_velocity, sample_sigmas
from .recover import FlowView, LossWeights, Phase, RecoverTask, recover, recover_batch, saved_projector

__all__ = ["EpsilonToFlow", "FeatureProjector", "FlowView", "LossWeights", "PROJECTIONS", "Phase", "RecoverTask",
           "flow_noise", "flow_velocity", "matching_blocks", "recover", "recover_batch", "sample_sigmas",
           "saved_projector"]
