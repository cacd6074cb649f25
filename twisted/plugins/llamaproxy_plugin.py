"""twistd plugin: `twistd llamaproxy`. Imports nothing but ServiceMaker (see DESIGN.md)."""

from twisted.application.service import ServiceMaker

llamaproxy = ServiceMaker(
    "llamaproxy",
    "llamaproxy.tap",
    "OpenAI-compatible gateway that supervises llama.cpp's llama-server",
    "llamaproxy",
)
