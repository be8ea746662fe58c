"""Settings at start-up: a misspelt EAGLE_* variable is an error, the token from a file."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

from service import settings


def test_an_unknown_eagle_variable_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ValueError) as info:
        settings.load([], env={"EAGLE_GRACE_SECOND": "60", "EAGLE_PORT": "1"})
    assert str(info.value) == (
        "unknown setting variable: EAGLE_GRACE_SECOND (did you mean EAGLE_GRACE_SECONDS?); "
        "every EAGLE_* variable must name a setting (`eagle-serve --help` lists them)")
    with pytest.raises(ValueError, match=r"^unknown setting variables: EAGLE_A, EAGLE_ZZZ_"):
        settings.load([], env={"EAGLE_ZZZ_TOP": "1", "EAGLE_A": "1"})
    # the test suite's own and the client's variables are not the server's business
    assert settings.load([], env={"EAGLE_TEST_DEVICE": "cpu", "EAGLE_SERVER": "x:1",
                                  "EAGLE_TOKEN": "t"}).port == 50051


def test_the_token_comes_from_a_file_by_flag_or_variable(tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("from-a-secret\n")
    assert settings.load([], env={"EAGLE_AUTH_TOKEN_FILE": str(token)}).auth_token == \
        "from-a-secret"
    assert settings.load(["--auth-token-file", str(token)], env={}).auth_token == \
        "from-a-secret"
    missing = tmp_path / "absent"
    with pytest.raises(ValueError) as info:  # fail closed: never serve without the token
        settings.load([], env={"EAGLE_AUTH_TOKEN_FILE": str(missing)})
    assert str(info.value) == (f"the auth token file {str(missing)!r} cannot be read (No such "
                               f"file or directory)")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty$"):
        settings.load([], env={"EAGLE_AUTH_TOKEN_FILE": str(tmp_path / "empty")})


def test_the_server_exits_2_on_an_unknown_variable() -> None:
    proc = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                      "PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}",
                                                      "EAGLE_MAX_RUNING": "4"})
    assert proc.returncode == 2
    assert "unknown setting variable: EAGLE_MAX_RUNING (did you mean EAGLE_MAX_RUNNING?)" in \
        proc.stderr


def test_the_attention_backend_is_a_setting_and_an_unknown_one_is_refused() -> None:
    assert settings.load([]).attention == "gather"
    assert settings.load(["--attention", "flex"]).attention == "flex"
    assert settings.load([], env={"EAGLE_ATTENTION": "flex"}).attention == "flex"
    with pytest.raises(ValueError) as info:
        settings.load(["--attention", "flash"])
    assert str(info.value) == "--attention 'flash': use gather or flex"
