"""API keys: the key file, the live key set, and who a request belongs to."""
