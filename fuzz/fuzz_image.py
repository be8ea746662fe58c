"""atheris harness: decode_image with the production limits may raise MediaError, nothing else.

Run: python fuzz/fuzz_image.py -max_total_time=120 -timeout=5 -rss_limit_mb=2048 [corpus/]
(`make fuzz` runs both harnesses with a seed corpus made on the fly.)"""
from __future__ import annotations

import sys

import atheris
import numpy  # noqa: F401  (libraries we do not fuzz are imported uninstrumented)
import PIL.Image  # noqa: F401
import torch  # noqa: F401

with atheris.instrument_imports(include=["preprocess"]):
    from preprocess.errors import MediaError
    from preprocess.media import ImagePolicy, open_image
    from preprocess.tiler import split_tiles

POLICY = ImagePolicy()


def one(data: bytes) -> None:
    try:
        opened = open_image(data, POLICY, "image 1")
        image = opened.load()
        for kernel in ("pillow", "torch"):  # both styles' resize
            split_tiles(image, max_tiles=2, kernel=kernel)
    except MediaError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
