"""Container checks: the Grafana dashboard, compose and Kubernetes files (unit tests here), and the
client side of ``scripts/test-docker.sh`` (``tests/containers/client.py``)."""
