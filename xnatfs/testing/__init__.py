"""An XNAT 1.8-compatible server for tests, demos and benchmarks (``xnatfs testserver``).

It needs the ``server`` extra (aiohttp, pydicom, nibabel, numpy).
"""
