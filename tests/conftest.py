"""pytest configuration shared by the test files."""

# tests/bench.py is a script that prints performance ratios; it is run by hand, never collected as a test.
collect_ignore = ["bench.py"]
