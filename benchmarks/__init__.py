"""Benchmarks, run as scripts: ``python benchmarks/NAME.py --help``.

A package so that ``benchmarks/queue.py`` is the module ``benchmarks.queue`` for mypy, not a
top-level ``queue`` shadowing the standard library's.
"""
