"""Benchmarks (issue 9): not unit tests; timing lives here, never in tests/."""
