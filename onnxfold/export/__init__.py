"""Exporters that produce ONNX models onnxfold can fold (Hugging Face folders)."""
