"""Shared library of the hybrid cervical-risk teaching kit.

Notebooks narrate and show; everything they compute lives here and is unit-tested.
Start with :mod:`lib.config` (where data and outputs live, run profiles).
"""
__version__ = "0.1.0"
