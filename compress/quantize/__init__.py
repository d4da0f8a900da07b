"""Export and quantization: static-shape ONNX artifacts, W8A16 / W8A8 QDQ for QNN (ONNX Runtime or neural-compressor),
per-module sensitivity and fallback, and the QNN HTP check."""
