"""The manual pages: their sources (man/src/*.txt) and the generator (man/build.py)."""
