"""rampiped: keeps write-hot directories in RAM and writes them back to disk, safely."""

__version__ = "0.1.0"
