import os

import pytest
import torch
from hypothesis import settings

# The default run (the README's test command, and CI) draws the same examples every time, so a
# fresh clone passes or fails as CI did; HYPOTHESIS_PROFILE=fuzz draws new, and many more.
settings.register_profile("default", derandomize=True, print_blob=True)
settings.register_profile("fuzz", derandomize=False, max_examples=500, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _doctest_torch(doctest_namespace):
    """Docstring examples use ``torch`` and the public names without importing them."""
    import implicit_layers

    doctest_namespace["torch"] = torch
    for name in implicit_layers.__all__:
        doctest_namespace[name] = getattr(implicit_layers, name)
