"""Helpers shipped with kvtier for tests, the demo and benchmarks."""
