"""A ``dlora`` subcommand that imports its module only when run."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable


def lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand that imports its module only when run: ``dlora --help`` stays quick and
    services do not load torch for nothing."""

    def run(args: argparse.Namespace) -> int:
        module, name = target.split(":")
        handler: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), name)
        return handler(args)

    return run
