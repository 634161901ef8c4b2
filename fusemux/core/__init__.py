"""The engine-agnostic core of fusemux.

Everything that decides (exports, mounts, handles, namespace, xattrs) lives here. No module in
this package imports a FUSE binding; engines in :mod:`fusemux.engines` translate to and from
it.
"""
