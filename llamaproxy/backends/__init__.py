"""Backends: what one is, the backends file, routing strategies, breakers, admission (slots and the
fair queue) and forwarding."""
