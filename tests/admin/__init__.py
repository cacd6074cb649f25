"""Tests of the operator page (llamaproxy.admin)."""
