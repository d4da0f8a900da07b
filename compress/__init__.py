"""Compression transforms: pruning, distillation, quantization (built in later milestones)."""
