"""Benchmarks of fusemux against native I/O, mergerfs and a bare pyfuse3 passthrough."""
