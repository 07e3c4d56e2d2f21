"""Python-backend implementations of the composing models (the CPU target).

Each rendered `<model>/1/model.py` is a one-line import of the class defined here, so the
code lives in the package (tested, linted) and the repository only carries configs and data.
"""
