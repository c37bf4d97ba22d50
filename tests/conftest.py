"""Shared fixtures: the zoo of tiny exported models (exported once per session)."""
import pytest

import zoo


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def zoo_model(zoo_dir):
    """zoo_model(arch, mode) -> path of the exported .onnx (cached for the session)."""
    return lambda arch, mode: zoo.exported(arch, mode, zoo_dir)
