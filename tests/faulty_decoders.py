"""Decoders that misbehave the way native code can, for the video worker tests."""
from __future__ import annotations

import os
import time


def hang(**kwargs):
    time.sleep(3600)


def abort(**kwargs):
    os.abort()


def hog(**kwargs):
    return bytearray(8 * 1024**3)  # far over the worker's address-space limit
