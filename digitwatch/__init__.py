"""digitwatch: reads handwritten digits off scans dropped into an inbox folder."""

__version__ = "0.1.0"
