"""pytest configuration shared by the test files."""

# tests/bench.py is a script that prints performance ratios; it is run by hand, never collected as a test.
collect_ignore = ["bench.py"]

import os

import pytest

# A small shapes base model shared by every test that needs one (one build per machine and budget; the
# cache file name contains the step count, so it never collides with the full default base model).
TEST_BASE_STEPS = 150


@pytest.fixture(scope="session")
def shapes_base():
    """Path of a small shapes base model (built once, ~1 minute on 2 cores, then cached)."""
    import common
    return common.shapes_base_path(steps=TEST_BASE_STEPS, progress=False)
