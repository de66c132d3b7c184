"""Adapter versions. A worker's engine holds each version of an adapter under its own key,
``name@version``, so requests running on a version finish on it while new requests take the one
registered now; everything the worker publishes speaks of the name. Pure.

Registered names cannot hold '@' (``gateway/admin.py``), so the key splits back unambiguously.
"""

from __future__ import annotations


def engine_key(name: str, version: str) -> str:
    """The engine's name for one version of an adapter (the plain name for an unversioned entry)."""
    return f"{name}@{version}" if version else name


def name_of(key: str) -> str:
    return key.partition("@")[0]


def version_of(key: str) -> str:
    return key.partition("@")[2]
