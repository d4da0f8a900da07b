"""Quantization and export: ONNX export with static shapes (and, later, QDQ quantization and the QNN check)."""
