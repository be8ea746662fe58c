"""Write seed corpora for the fuzz harnesses: valid files of each format and damaged copies."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import factory  # noqa: E402


def main(out: str) -> None:
    root = Path(out)
    images, videos = root / "image", root / "video"
    images.mkdir(parents=True, exist_ok=True)
    videos.mkdir(parents=True, exist_ok=True)
    photo = factory.photo(96, 64)
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP"):
        data = factory.encode(photo.convert("P") if fmt == "GIF" else photo, fmt)
        (images / f"seed.{fmt.lower()}").write_bytes(data)
        (images / f"cut.{fmt.lower()}").write_bytes(data[: len(data) // 2])
    for fmt, ext in (("mp4", "mp4"), ("matroska", "mkv")):
        data = factory.video(None, seconds=1, fps=10, width=64, height=48, fmt=fmt)
        (videos / f"seed.{ext}").write_bytes(data)
        (videos / f"cut.{ext}").write_bytes(data[: len(data) // 2])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fuzz/corpus")
