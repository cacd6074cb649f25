"""llamaproxy's test suite.

Unit tests run on fakes; tests/e2e run against the real twistd + llama-server.
"""

from hypothesis import HealthCheck, settings

# Twisted's own deterministic profile (src/twisted/trial/test/__init__.py).
settings.register_profile(
    "llamaproxy", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("llamaproxy")
