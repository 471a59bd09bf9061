"""Command-line entry points: the top of the import graph.

``fedcxr`` (``cli.main``) dispatches to one module per command. These modules may import
``common``, ``client`` and ``server``; nothing imports them (tests and benchmarks aside).
Keeping every entry point here is what lets ``common`` stay a library that imports neither
side, and ``client`` and ``server`` import only ``common``.
"""
