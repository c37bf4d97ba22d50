"""`python -m onnxfold` runs the command line."""

from onnxfold.cli.main import entry

entry()
