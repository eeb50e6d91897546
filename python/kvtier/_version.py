"""The kvtier version. python/BUILD.bazel names the wheel with the same
string; tools/build_wheel.py refuses to build when the two disagree."""

__version__ = "0.1.0"
