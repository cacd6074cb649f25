"""llamaproxy: a production gateway for self-hosted LLMs, in front of llama.cpp's llama-server."""

__version__ = "0.1.0"

#: The llama.cpp release our build script pins and our tests run against.
LLAMA_CPP_VERSION = "b11434"
