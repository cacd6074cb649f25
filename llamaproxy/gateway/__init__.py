"""The gateway site: request limits, public routes, and the streaming proxy to the backends."""
