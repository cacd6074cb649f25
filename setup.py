"""Packaging for llamaproxy, a Twisted gateway in front of llama.cpp's llama-server."""

import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(
    r'^__version__ = "([^"]+)"', Path("llamaproxy/__init__.py").read_text(), re.M
).group(1)

setup(
    name="llamaproxy",
    version=version,
    description="Production gateway for self-hosted LLMs: supervises llama-server, speaks the OpenAI API",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # twisted/plugins has no __init__.py on purpose (see docs/operations.md); list it explicitly.
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    package_data={
        "twisted.plugins": ["llamaproxy_plugin.py"],
        "llamaproxy.admin": ["static/*.js", "static/*.css"],
    },
    install_requires=[
        # 26.10 is the only release tested: 26.4's twistd exits 0 on an invalid option (a startup
        # error must fail the start) and differs in three functions the fast paths copy.
        "twisted[tls]>=26.10,<26.11",
        "klein>=23.12",
        "treq>=23.11",
        "attrs>=23.1",
        "prometheus-client>=0.26",
        # shared state of replicas (STATE_URL): Twisted-native Redis client, loaded only then,
        # and the C reply parser it uses when installed (a third of the CPU per call)
        "txredisapi>=1.6",
        "hiredis>=3.0",
        # the backend client's response parser (llhttp; fast path only): 0.8 and 0.9 tested, each
        # minor release may move llhttp, whose strictness decides what a malformed response does
        "httptools>=0.8,<0.10",
    ],
    extras_require={
        "test": [
            "openai>=1.40",
            "httpx>=0.27",
            "gguf>=0.10",
            "numpy",
            "hypothesis>=6.100",
            "coverage>=7.4",
            "ruff>=0.6",
            "mypy>=1.11,<2.5",
            "mypy-zope>=1.0.17",
            # browser tests of the operator page: drives Debian's chromium + chromium-driver
            "selenium>=4.20",
            # the container and Kubernetes files' tests (tests/containers)
            "pyyaml>=6.0",
            "jsonschema>=4.17",
        ],
    },
    entry_points={"console_scripts": ["llamaproxy=llamaproxy.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3.11",
        "Topic :: Internet :: Proxy Servers",
    ],
)
