"""Tests for llamaproxy.gateway."""
