"""Subcommands of ``sam3d``: each module has ``add_parser(subparsers)`` that sets ``run``."""
