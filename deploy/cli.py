"""Argument parsing shared by deploy/'s command lines."""
from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """Bad input is one line on stderr and exit code 2, not argparse's usage block."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)
