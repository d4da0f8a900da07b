"""Architectures, presets, codecs and text encoders (built in later milestones)."""
