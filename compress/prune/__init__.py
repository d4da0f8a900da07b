"""Structured pruning: importance criteria and width (channel) pruning of any module, saved without pickle."""
from .importance import CRITERIA, make_importance
from .width import WidthPlan, load_pruned, prune_width, save_pruned

__all__ = ["CRITERIA", "WidthPlan", "load_pruned", "make_importance", "prune_width", "save_pruned"]
