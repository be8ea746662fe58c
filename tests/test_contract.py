"""The contract under the Buf CLI: STANDARD lint, breaking changes against the baseline, and
generation for other languages (`make lint`, `make protos`)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT

BASELINE = "protos/eagle/v1/baseline.binpb"


@pytest.fixture(scope="module")
def buf() -> str:
    """The buf executable of the dev extra (buf-bin installs it beside python's scripts)."""
    found = shutil.which("buf") or shutil.which("buf", path=sysconfig.get_path("scripts"))
    assert found, "buf is not installed: `make install` brings it with the dev extra (buf-bin)"
    return found


def run(buf: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([buf, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def copy(tmp_path: Path) -> Path:
    """The module (buf.yaml, protos/ with the baseline) in a folder of its own to break."""
    shutil.copy(ROOT / "buf.yaml", tmp_path)
    shutil.copytree(ROOT / "protos", tmp_path / "protos",
                    ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    return tmp_path


def edit(copy: Path, old: str, new: str) -> None:
    proto = copy / "protos/eagle/v1/chat.proto"
    text = proto.read_text()
    assert text.count(old) == 1, old
    proto.write_text(text.replace(old, new))


def test_the_contract_is_lint_clean_under_standard_rules(buf) -> None:
    result = run(buf, "lint")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    config = (ROOT / "buf.yaml").read_text()
    assert "STANDARD" in config and "except" not in config  # no rule turned off


def test_the_contract_has_no_breaking_change_against_the_baseline(buf) -> None:
    result = run(buf, "breaking", "--against", BASELINE)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_a_planted_lint_violation_fails_with_bufs_message(buf, copy) -> None:
    edit(copy, "  ROLE_ASSISTANT = 3;\n", "  ROLE_ASSISTANT = 3;\n  // A planted value.\n"
                                          "  TOOL = 4;\n")
    result = run(buf, "lint", cwd=copy)
    assert result.returncode == 100
    assert result.stdout.strip().endswith(
        'Enum value name "TOOL" should be prefixed with "ROLE_".')


@pytest.mark.parametrize("old,new,message", [
    ("  // Keep only the top_k most likely tokens. 0: no limit.\n  uint32 top_k = 4;\n", "",
     'Previously present field "4" with name "top_k" on message "GenerationConfig" was '
     'deleted.'),
    ("  bool ignore_eos = 8;", "  bool ignore_eos = 98;",
     'Previously present field "8" with name "ignore_eos" on message "GenerationConfig" was '
     'deleted.'),
    ("  FINISH_REASON_LENGTH = 2;", "  FINISH_REASON_MAX_TOKENS = 2;",
     'Enum value "2" on enum "FinishReason" changed name from "FINISH_REASON_LENGTH" to '
     '"FINISH_REASON_MAX_TOKENS".'),
], ids=["removed field", "renumbered field", "renamed enum value"])
def test_a_breaking_change_fails_with_bufs_message(buf, copy, old, new, message) -> None:
    edit(copy, old, new)
    result = run(buf, "breaking", "--against", BASELINE, cwd=copy)
    assert result.returncode == 100
    assert message in result.stdout


def test_an_added_field_is_not_breaking(buf, copy) -> None:
    edit(copy, "  bool ignore_eos = 8;", "  bool ignore_eos = 8;\n  // New.\n  bool extra = 99;")
    assert run(buf, "breaking", "--against", BASELINE, cwd=copy).returncode == 0


def test_the_contract_generates_for_go_java_and_cpp_as_declared(buf) -> None:
    result = subprocess.run([sys.executable, "protos/check_contract.py", "--buf", buf],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("contract: buf build ok; Java and C++ generated; "
                                     "go_package well formed")


def test_the_go_and_java_checks_catch_wrong_options(copy) -> None:
    sys.path.insert(0, str(ROOT / "protos"))
    try:
        import check_contract
    finally:
        sys.path.pop(0)
    from google.protobuf import descriptor_pb2

    f = descriptor_pb2.FileDescriptorProto(name="eagle/v1/chat.proto")
    f.options.go_package = "github.com/x/y/gen/go/eagle;eagle_v1"
    assert check_contract.go_problems(f) == [
        "eagle/v1/chat.proto: go_package import path 'github.com/x/y/gen/go/eagle' does not "
        "end in /eagle/v1",
        "eagle/v1/chat.proto: go_package name 'eagle_v1' is not a plain Go package name"]
    f.options.java_package = "com.example"
    assert check_contract.java_problems(f, copy) == [
        "eagle/v1/chat.proto: java_package and java_multiple_files must both be set"]
