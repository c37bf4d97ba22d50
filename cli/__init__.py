"""onnxfold's command line (installed as onnxfold.cli)."""
