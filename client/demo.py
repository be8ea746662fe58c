"""`make demo`: make a sample image and video, then ask the running server through the CLI."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client import cli


def make_media(folder: Path) -> tuple[Path, Path]:
    """A 1024x768 gradient photo and a 4-second 320x240 H.264 clip (needs the server extra)."""
    import av
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:768, 0:1024]
    rgb = np.stack([x * 255 // 1024, y * 255 // 768, (x + y) * 255 // 1792], -1).astype(np.uint8)
    image = folder / "sample.jpg"
    Image.fromarray(rgb).save(image, quality=90)
    video = folder / "sample.mp4"
    with av.open(str(video), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(40):
            frame = np.roll(rgb[:240, :320], i * 8, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return image, video


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eagle-demo")
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--media-dir", default=".demo/media",
                   help="the server's media root (make serve uses .demo/media)")
    args = p.parse_args(argv)
    image, video = make_media(Path(args.media_dir))
    base = ["--server", args.server, "--max-tokens", "24"]
    print("$ eagle-chat --no-stream --usage --image", image, '"What is in this picture?"')
    code = cli.main(base + ["--no-stream", "--usage", "--image", str(image),
                            "What is in this picture?"])
    print(f"$ eagle-chat --usage --video {video.name} --frames 8 \"What happens in this video?\"")
    code = code or cli.main(base + ["--usage", "--video", video.name, "--frames", "8",
                                    "What happens in this video?"])
    print("(the embedded tiny model has random weights: its answers are nonsense by design)")
    return code


if __name__ == "__main__":
    sys.exit(main())
