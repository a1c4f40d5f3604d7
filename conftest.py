import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_torch(doctest_namespace):
    """Docstring examples use ``torch`` and the public names without importing them."""
    import implicit_layers

    doctest_namespace["torch"] = torch
    for name in implicit_layers.__all__:
        doctest_namespace[name] = getattr(implicit_layers, name)
