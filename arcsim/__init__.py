"""arcsim: a Byzantine-robust distributed learning testbed built around Adaptive Robust Clipping."""

__version__ = "0.1.0"
