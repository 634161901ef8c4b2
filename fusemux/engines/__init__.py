"""FUSE engines: thin adapters that translate kernel requests into calls on the core.

Only modules in this package may import a FUSE binding such as pyfuse3.
"""
