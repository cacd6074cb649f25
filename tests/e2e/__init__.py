"""End-to-end tests.

They drive the real `twistd llamaproxy` and a real llama-server with the official openai client.
"""
