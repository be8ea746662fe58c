"""atheris harness: decode_video on arbitrary bytes may raise MediaError, nothing else, and
must return within the timeout. Run like fuzz_image.py."""
from __future__ import annotations

import sys

import atheris
import numpy  # noqa: F401  (libraries we do not fuzz are imported uninstrumented)
import PIL.Image  # noqa: F401
import torch  # noqa: F401

with atheris.instrument_imports(include=["preprocess"]):
    from preprocess.errors import MediaError
    from preprocess.frames import VideoPolicy, decode_video

POLICY = VideoPolicy(timeout_s=4.0, max_decoded_frames=2000, threads=1)


def one(data: bytes) -> None:
    try:
        decode_video(data, 4, size=64, policy=POLICY, label="video 1",
                     kernel="torch" if len(data) % 2 else "pillow")
    except MediaError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
