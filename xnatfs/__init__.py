"""xnatfs: mount an XNAT archive as a filesystem."""

__version__ = "0.1.0"
