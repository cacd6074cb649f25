"""Supervision of local llama-server children: the process, its readiness probe and the scrape of
its own metrics."""
