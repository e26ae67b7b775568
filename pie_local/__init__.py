"""pie-local: a programmable inference engine for one machine."""

__version__ = "0.1.0"
