"""pytest configuration shared by the test files."""

# tests/bench.py is a script that prints performance ratios; it is run by hand, never collected as a test.
collect_ignore = ["bench.py"]

import os

import pytest

# A small shapes base model shared by every test that needs one (one build per machine and budget; the
# cache file name contains the step count, so it never collides with the full default base model).
# 300 steps of 64 = 19,200 samples, the sample count of the earlier 150-step test base (steps of 128) that the
# learning tests were written against; 150 steps of 64 leave the shapes half-learned (DeGLA's and GOAL's
# 20-step learning tests then measured 58.72 -> 58.61 and 27.5 -> 27.5).
TEST_BASE_STEPS = 300


@pytest.fixture(scope="session")
def shapes_base():
    """Path of a small shapes base model (built once, about 3 minutes on 2 idle cores, then cached)."""
    import common
    return common.shapes_base_path(steps=TEST_BASE_STEPS, progress=False)
