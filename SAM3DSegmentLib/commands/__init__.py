"""Commands: the ``sam3d`` command line (``cli``), one module per subcommand.

Each subcommand module has ``add_parser(subparsers)``, which sets the function that runs it.
The top layer: it may import every layer and nothing imports it.
"""
