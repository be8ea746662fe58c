"""Settings from one definition: --help describes every flag in its group, a TOML config file
sits under variables and flags, --print-config writes what --config reads back."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest
from conftest import ROOT

from service import settings as settings_mod
from service.settings import GROUPS, Settings


def test_every_setting_has_a_group_a_description_and_a_flag_in_help() -> None:
    undocumented = [f.name for f in fields(Settings) if len(f.metadata.get("help", "")) < 12]
    assert undocumented == []
    assert {f.metadata["group"] for f in fields(Settings)} == set(GROUPS)
    text = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "100",
                               "PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}"}).stdout
    # the groups, in the order an operator reaches for them
    at = [text.index(f"\n{title}:\n") for title in GROUPS.values()]
    assert at == sorted(at)
    for f in fields(Settings):
        flag = settings_mod.flag(f)
        assert f"  {flag} " in text, flag
        # its description and variable sit in its own group's section
        group = list(GROUPS).index(f.metadata["group"])
        end = at[group + 1] if group + 1 < len(at) else len(text)
        assert at[group] < text.index(f"  {flag} ") < end, flag
    squashed = " ".join(text.split())
    assert "--max-itl-slowdown X how many times a plain decode step the running" in squashed
    assert ("prompt is prefilled: each chunk is sized by its measured cost (0: chunks of "
            "token_budget instead) [default 2.0; env EAGLE_MAX_ITL_SLOWDOWN]") in squashed
    assert ("Precedence, highest first: flags, then environment variables, then the config "
            "file, then the defaults.") in squashed
    assert text.startswith("usage: eagle-serve [--config FILE] [--print-config] "
                           "[--SETTING VALUE ...]\n")


def test_flags_over_variables_over_the_file_over_defaults(tmp_path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('max_running = 8\nmax_queue = 20\nlog_level = "DEBUG"\n'
                      '[scheduling]\ntoken_budget = 512\n')
    env = {"EAGLE_CONFIG": str(config), "EAGLE_MAX_QUEUE": "30", "EAGLE_MAX_RUNNING": "9"}
    s = settings_mod.load(["--max-running", "10"], env=env)
    # flag > variable > file > default, each where it is the highest source
    assert (s.max_running, s.max_queue, s.log_level, s.token_budget, s.chunk_above) == \
        (10, 30, "DEBUG", 512, 4096)
    # --config names the file too, and wins over EAGLE_CONFIG
    other = tmp_path / "other.toml"
    other.write_text("max_queue = 40\n")
    assert settings_mod.load(["--config", str(other)],
                             env={"EAGLE_CONFIG": str(config)}).max_queue == 40
    assert settings_mod.load_all(["--config", str(other)], env={}).config_file == str(other)


def test_the_file_refuses_unknown_keys_wrong_types_and_the_token(tmp_path) -> None:
    config = tmp_path / "server.toml"

    def refused(text: str) -> str:
        config.write_text(text)
        with pytest.raises(ValueError) as info:
            settings_mod.load(["--config", str(config)], env={})
        return str(info.value)

    where = f"the config file {str(config)!r}"
    assert refused("max_runing = 4\n") == (
        f"{where}: unknown key 'max_runing' (did you mean 'max_running'?); "
        f"`eagle-serve --help` lists the settings")
    assert refused("[engine]\nkv_cache_mbs = 4\n").startswith(
        f"{where}: unknown key 'kv_cache_mbs' (did you mean 'kv_cache_mb'?)")
    assert refused('max_running = "8"\n') == f"{where}: max_running = '8' is not an integer"
    assert refused("prefix_cache = 1\n") == f"{where}: prefix_cache = 1 is not true or false"
    assert refused('auth_token = "s3cret"\n') == (
        f"{where}: auth_token does not belong in a config file; put the token in a Secret and "
        f"name it with auth_token_file")
    assert refused("max_running = \n").startswith(f"{where} is not TOML: ")
    with pytest.raises(ValueError, match="cannot be read \\(No such file or directory\\)$"):
        settings_mod.load(["--config", str(tmp_path / "absent.toml")], env={})
    # an integer where a float is wanted is a number; the token file comes from the file too
    token = tmp_path / "token"
    token.write_text("from-a-secret\n")
    config.write_text(f'grace_seconds = 5\nauth_token_file = "{token}"\n'
                      f'media_roots = ["{tmp_path}"]\n')
    s = settings_mod.load(["--config", str(config)], env={})
    assert (s.grace_seconds, s.auth_token, s.media_roots) == (5.0, "from-a-secret",
                                                              (str(tmp_path),))


def test_print_config_writes_what_config_reads_back_with_the_token_redacted(tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-value\n")
    argv = ["--max-running", "12", "--media-root", str(tmp_path), "--auth-token-file",
            str(token), "--drain-delay-s", "2.5", "--prefix-cache", "false"]
    run = subprocess.run([sys.executable, "-m", "service", *argv, "--print-config"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "EAGLE_MAX_QUEUE": "33",
                              "PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}"})
    assert run.returncode == 0, run.stderr
    assert "s3cret-value" not in run.stdout
    assert "# auth_token = (redacted, set: name a file with auth_token_file)" in run.stdout
    assert "\n[scheduling]  # Scheduling\n" in run.stdout
    printed = tmp_path / "printed.toml"
    printed.write_text(run.stdout)
    again = settings_mod.load(["--config", str(printed)], env={})
    expected = settings_mod.load(argv, env={"EAGLE_MAX_QUEUE": "33"})
    assert again == expected  # the token again from auth_token_file
    assert (again.max_running, again.max_queue, again.prefix_cache) == (12, 33, False)


def test_the_settings_reference_is_generated_from_the_definition() -> None:
    text = settings_mod.markdown()
    for f in fields(Settings):
        assert f"`{settings_mod.variable(f)}`" in text
        assert f.metadata["help"] in text
    assert text.index("## Model") < text.index("## Observability")
