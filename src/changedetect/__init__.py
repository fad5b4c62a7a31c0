"""changedetect: map destruction in before/after satellite or aerial images."""

__version__ = "0.1.0"
