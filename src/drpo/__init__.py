"""drpo: DRPO and the trust-region policy objectives it is compared with."""

__version__ = "0.1.0"
