"""pytest configuration shared by the test files."""

# tests/bench.py is a script that prints performance ratios; it is run by hand, never collected as a test.
collect_ignore = ["bench.py"]

import pytest


@pytest.fixture(scope="session")
def shapes_base():
    """Path of the shipped CLIP base model (models/shapes-tiny-vit-shapes-base.pt, hash-checked)."""
    import common
    return common.shapes_base_path(common.TINY_MODEL)


@pytest.fixture(scope="session")
def shapes_siglip_base():
    """Path of the shipped SigLIP base model (models/shapes-tiny-siglip-shapes-base.pt, hash-checked)."""
    import common
    return common.shapes_base_path(common.SHAPES_SIGLIP_MODEL)
