"""Arguments every config-reading subcommand shares, for the CLI and the subcommands registered
from other modules (r2d3ray/eval/commands.py), which import this rather than the CLI itself.

It imports nothing heavy: `r2d3ray --help` stays instant.
"""

from __future__ import annotations

import argparse


def add_config_args(parser: argparse.ArgumentParser, required: bool = True,
                     what: str = "YAML run config, e.g. configs/toy.yaml") -> None:
    parser.add_argument("--config", required=required, metavar="FILE", help=what)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set training.lr=1e-4 (repeatable)",
    )
