"""Shared fixtures: the zoo of tiny exported models (exported once per session). In the test suite a
rule that raises is a bug: discovery stops with RuleBug instead of freezing the node's groups."""

import os

import pytest
import zoo

os.environ["ONNXFOLD_STRICT_RULES"] = "1"


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def zoo_model(zoo_dir):
    """zoo_model(arch, mode) -> path of the exported .onnx (cached for the session)."""
    return lambda arch, mode: zoo.exported(arch, mode, zoo_dir)
