"""Typed server settings, built once at start-up from four sources, highest first: flags,
EAGLE_* environment variables, a TOML config file (--config / EAGLE_CONFIG), the defaults.

Every setting is defined once, below, with its group, its description and its unit: the
flag, the variable, the config file key, `--help`, `--print-config` and docs/settings.md
(generated: `python -m service.settings --markdown`) all come from that definition.
"""
from __future__ import annotations

import argparse
import difflib
import ipaddress
import os
import re
import sys
from dataclasses import Field, dataclass, field, fields
from pathlib import Path

import tomllib

MiB = 1024 * 1024

# The groups, in the order an operator reaches for them.
GROUPS = {
    "model": "Model",
    "engine": "Engine and KV cache",
    "scheduling": "Scheduling",
    "limits": "Request limits",
    "media": "Media",
    "security": "Security",
    "network": "Network and fleet",
    "observability": "Observability",
}


def _s(default: object, group: str, help: str, *, default_text: str = "",
       secret: bool = False) -> Field:
    """One setting: its default, its group (a key of GROUPS), a one-line description that
    names its unit, and how to say the default when the value itself says little (0: ...)."""
    assert group in GROUPS, group
    return field(default=default, repr=not secret,
                 metadata={"group": group, "help": help, "default_text": default_text,
                           "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Every knob of the server, with its default (see the module's docstring)."""

    # -- model
    model: str = _s("tiny", "model", "checkpoint folder, a hub id already in the local "
                    "Hugging Face cache, or tiny / tiny-mob / tiny-2.5 (random weights, built "
                    "locally); never downloaded")
    device: str = _s("auto", "model", "auto (CUDA when visible), cpu, cuda or cuda:N (one "
                     "process per GPU)")
    dtype: str = _s("auto", "model", "auto (bfloat16 on CUDA, float32 on CPU), bfloat16, "
                    "float16 or float32")
    context_length: int = _s(0, "model", "tokens of prompt + reply a request may hold",
                             default_text="0: the config's max_position_embeddings")
    prompt_style: str = _s("auto", "model", "prompt and frame sampler for checkpoints that "
                           "ship neither chat_template.json nor processor_config.json: auto "
                           "(by layout), eagle2 (the worker's) or eagle2.5 (the processor's)")
    cache_dir: str = _s("", "model", "folder for the tiny models and other built files",
                        default_text="~/.cache/eagle-grpc")
    # -- engine and KV cache
    kv_cache_mb: int = _s(0, "engine", "MiB of the KV block pool (keys and values of every "
                          "running and cached token)",
                          default_text="0: a quarter of free RAM on CPU; on CUDA 85% of the "
                                       "free memory after the weights, less 2 GiB")
    kv_block_size: int = _s(16, "engine", "tokens per KV block (a divisor of 64); prefix "
                            "caching shares whole blocks")
    prefix_cache: bool = _s(True, "engine", "reuse the KV blocks of earlier prompts that start "
                            "alike (per bearer token and cache_salt)")
    attention: str = _s("gather", "engine", "decode attention: gather (SDPA over each row's "
                        "gathered blocks) or flex (FlexAttention over the pool, compiled on "
                        "CUDA)")
    compile_decode: bool = _s(True, "engine", "on CUDA, compile the decode step with "
                              "torch.compile before capturing its CUDA graphs (fewer, fused "
                              "kernels; compiled once at start, before SERVING; gather "
                              "attention only)")
    engine_process: bool = _s(True, "engine", "run the model in a child process with its own "
                              "GIL, restarted when it dies")
    engine_restarts: int = _s(3, "engine", "engine-process deaths tolerated within the window; "
                              "one more is a crash loop and the server exits 3")
    engine_restart_window_s: float = _s(300.0, "engine", "seconds over which engine-process "
                                        "deaths are counted")
    step_timeout_s: float = _s(120.0, "engine", "seconds a model step may run before the "
                               "replica is declared wedged (health NOT_SERVING, exit 3)")
    warmup: bool = _s(True, "engine", "run one request through the model before reporting "
                      "SERVING")
    preprocess_workers: int = _s(2, "engine", "threads decoding and tiling images")
    video_workers: int = _s(2, "engine", "video decoder processes (killed and replaced on a "
                            "hang or crash; 0: decode in the engine's threads)")
    video_memory_mb: int = _s(4096, "engine", "MiB of address space each video decoder "
                              "process may map")
    gil_switch_ms: float = _s(0.5, "engine", "milliseconds of Python's thread switch interval "
                              "in the server process (sys.setswitchinterval)")
    # -- scheduling
    max_running: int = _s(16, "scheduling", "requests generating at once (the decode batch)")
    max_queue: int = _s(64, "scheduling", "requests waiting for a running slot; beyond it "
                        "calls are refused with RESOURCE_EXHAUSTED")
    max_batch_tokens: int = _s(262_144, "scheduling", "prompt tokens admitted into one "
                               "prefill batch")
    token_budget: int = _s(0, "scheduling", "tokens one scheduler iteration computes: decode "
                           "rows first, the rest for a long prompt's next chunk (with "
                           "max_itl_slowdown: the first chunk, and a set one caps them all)",
                           default_text="0: the device's, 256 on CPU, 2048 on CUDA")
    chunk_above: int = _s(4096, "scheduling", "prompt tokens above which a prompt is prefilled "
                          "in chunks between decode steps (0: always one pass)")
    max_itl_slowdown: float = _s(2.0, "scheduling", "how many times a plain decode step the "
                                 "running streams' inter-token gap may become while a long "
                                 "prompt is prefilled: each chunk is sized by its measured cost "
                                 "(0: chunks of token_budget instead)")
    default_deadline_s: float = _s(600.0, "scheduling", "seconds allowed to a call that comes "
                                   "without a deadline")
    # -- request limits
    max_request_bytes: int = _s(64 * MiB, "limits", "bytes of one request message")
    max_messages: int = _s(64, "limits", "messages in one request")
    max_parts: int = _s(128, "limits", "parts (text, images, videos) in one request")
    max_text_chars: int = _s(200_000, "limits", "characters of text in one request")
    max_images: int = _s(16, "limits", "images in one request")
    max_image_bytes: int = _s(20 * MiB, "limits", "bytes of one encoded image")
    max_image_pixels: int = _s(64_000_000, "limits", "pixels of one decoded image")
    max_tiles_per_image: int = _s(40, "limits", "448x448 tiles one image may be cut into")
    max_videos: int = _s(4, "limits", "videos in one request")
    max_video_frames: int = _s(0, "limits", "frames sampled from one video",
                               default_text="0: the model's, 64 for Eagle2, 256 for Eagle2.5")
    default_video_frames: int = _s(0, "limits", "frames sampled when a request names none",
                                   default_text="0: the model's, 32 for Eagle2, Eagle2.5's "
                                                "2 frames a second up to 256")
    max_video_bytes: int = _s(512 * MiB, "limits", "bytes of one video file")
    max_video_seconds: float = _s(3 * 3600.0, "limits", "seconds of one video's duration")
    max_new_tokens: int = _s(4096, "limits", "tokens one reply may generate")
    default_max_new_tokens: int = _s(512, "limits", "tokens a reply may generate when the "
                                     "request names no limit")
    default_temperature: float = _s(0.0, "limits", "sampling temperature when the request "
                                    "names none (0: greedy)")
    # -- media
    media_roots: tuple[str, ...] = _s((), "media", "folder that video and image references "
                                      "may point into (--media-root, repeatable; the "
                                      "variable takes a colon-separated list)",
                                      default_text="none: references refused")
    allow_urls: bool = _s(False, "media", "let requests reference videos by http(s) URL")
    video_timeout_s: float = _s(60.0, "media", "seconds one video's decode may take")
    device_decode: bool = _s(True, "media", "decode JPEGs with nvJPEG and tile them on the GPU "
                             "when the model is on CUDA")
    video_nvdec: bool = _s(False, "media", "decode videos with the GPU's NVDEC when the model is "
                           "on CUDA (7x slower than the CPU for short clips on an H200)")
    # -- security
    auth_token: str = _s("", "security", "tenants and their bearer tokens, one per line: "
                         "name:token [weight=W max_queue=N max_in_flight=N "
                         "tokens_per_minute=N], or bare tokens; prefer auth_token_file",
                         default_text="none: no authentication, one tenant", secret=True)
    auth_token_file: str = _s("", "security", "file holding the tenants and tokens (the "
                              "auth_token format), e.g. a mounted Secret; the server refuses "
                              "to start if it is missing, empty or malformed")
    tls_cert: str = _s("", "security", "PEM certificate chain for TLS on the gRPC port")
    tls_key: str = _s("", "security", "PEM private key for TLS on the gRPC port")
    tls_client_ca: str = _s("", "security", "PEM CA bundle: require client certificates "
                            "signed by it (mutual TLS)")
    insecure: bool = _s(False, "security", "allow plaintext on a non-loopback address (a mesh "
                        "sidecar terminates TLS)")
    # -- network and fleet
    host: str = _s("127.0.0.1", "network", "address the gRPC port listens on (0.0.0.0 for all)")
    port: int = _s(50051, "network", "the gRPC port")
    health_port: int = _s(0, "network", "a plaintext port serving only grpc.health.v1, for "
                          "probes when the gRPC port has TLS (0: none)")
    http_port: int = _s(0, "network", "a port serving the chat service over HTTP/1.1: the "
                        "Connect protocol (JSON or binary; curl, fetch) and gRPC-Web, plus "
                        "GET /healthz and /readyz; same host, and TLS when the gRPC port has "
                        "it (0: off)")
    http_cors_origins: str = _s("", "network", "comma-separated origins (scheme://host[:port], "
                                "or *) whose browser pages may call the HTTP port (CORS)",
                                default_text="none: only the pages it serves itself")
    max_concurrent_rpcs: int = _s(0, "network", "calls the server holds at once",
                                  default_text="0: running + queued + 64")
    grace_seconds: float = _s(30.0, "network", "seconds running calls get to finish after "
                              "SIGTERM")
    drain_delay_s: float = _s(1.0, "network", "seconds new calls are refused with UNAVAILABLE "
                              "after SIGTERM, before the port closes")
    max_connection_age_s: float = _s(300.0, "network", "seconds after which a connection is "
                                     "closed (+-10%) so clients rebalance over replicas "
                                     "(0: never)")
    max_connection_age_grace_s: float = _s(600.0, "network", "seconds a closing connection's "
                                           "calls get to finish")
    keepalive_time_ms: int = _s(60_000, "network", "milliseconds between the server's "
                                "keepalive pings")
    keepalive_timeout_ms: int = _s(20_000, "network", "milliseconds to wait for a ping's "
                                   "answer before closing the connection")
    min_ping_interval_ms: int = _s(10_000, "network", "milliseconds a client must leave between "
                                   "its pings")
    max_ping_strikes: int = _s(2, "network", "pings sent too often before the connection is "
                               "closed")
    # -- observability
    metrics_port: int = _s(0, "observability", "port of the Prometheus /metrics endpoint "
                           "(0: none)")
    metrics_host: str = _s("127.0.0.1", "observability", "address the metrics port listens on")
    log_format: str = _s("json", "observability", "json (one object a line) or text")
    log_level: str = _s("INFO", "observability", "DEBUG, INFO, WARNING or ERROR")
    ledger_file: str = _s("", "observability", "file to append each call's accepted and "
                          "final records to (soak tests)", default_text="none")

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.http_cors_origins.split(",") if o.strip()]

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    def describe(self) -> dict[str, object]:
        """The settings for the start-up log, secrets masked."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"]:
                value = "***" if value else ""
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def check(self) -> None:
        """Refuse combinations that would be unsafe or cannot work, saying what to change."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        loopback = self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
        if not self.tls and not loopback and not self.insecure:
            raise ValueError(f"refusing to serve plaintext on {self.host}: give --tls-cert and "
                             f"--tls-key, or --insecure when a mesh sidecar terminates TLS")
        if self.http_port and self.tls_client_ca and not (self.auth_token
                                                          or self.auth_token_file):
            raise ValueError("--http-port with --tls-client-ca names tenants by certificate, "
                             "which the HTTP port cannot read yet: give the tenants bearer "
                             "tokens (--auth-token or --auth-token-file) or leave the HTTP "
                             "port off")
        if self.http_port and self.http_port in (self.port, self.health_port,
                                                 self.metrics_port):
            raise ValueError(f"--http-port {self.http_port} is already the gRPC, health or "
                             f"metrics port")
        for origin in self.cors_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s:]+(:\d+)?", origin):
                raise ValueError(f"--http-cors-origins {origin!r}: give an origin as "
                                 f"scheme://host[:port] (no path), or * for any")
        for root in self.media_roots:
            if not Path(root).is_dir():
                raise ValueError(f"media root {root!r} is not a directory")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"--dtype {self.dtype!r}: use auto, bfloat16, float16 or float32")
        if self.prompt_style not in ("auto", "eagle2", "eagle2.5"):
            raise ValueError(f"--prompt-style {self.prompt_style!r}: use auto, eagle2 or "
                             f"eagle2.5")
        if self.max_video_frames and self.default_video_frames > self.max_video_frames:
            raise ValueError("--default-video-frames is above --max-video-frames")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("--default-max-new-tokens is above --max-new-tokens")
        if self.attention not in ("gather", "flex"):  # llm.ATTENTION, without torch here
            raise ValueError(f"--attention {self.attention!r}: use gather or flex")
        if self.kv_block_size < 1 or 64 % self.kv_block_size:
            raise ValueError(f"--kv-block-size {self.kv_block_size}: use 1, 2, 4, 8, 16, 32 "
                             f"or 64 (a divisor of the 64-key attention grain)")
        from service import tenants  # the token file's syntax: refused at start-up

        tenants.from_settings(self.auth_token, bool(self.tls_client_ca))
        if self.max_itl_slowdown and self.max_itl_slowdown <= 1:
            raise ValueError(f"--max-itl-slowdown {self.max_itl_slowdown:g}: use a factor above "
                             f"1 (2: a long prompt may double the streams' gap), or 0 for "
                             f"chunks of --token-budget")
        if self.log_format not in ("json", "text"):
            raise ValueError(f"--log-format {self.log_format!r}: use json or text")


def flag(f: Field) -> str:
    return "--media-root" if f.name == "media_roots" else "--" + f.name.replace("_", "-")


def variable(f: Field) -> str:
    return f"EAGLE_{f.name.upper()}"


def default_text(f: Field) -> str:
    """The default as the docs and --help say it."""
    if f.metadata["default_text"]:
        return f.metadata["default_text"]
    if isinstance(f.default, bool):
        return "true" if f.default else "false"
    if f.default == "":
        return "empty"
    return str(f.default)


# -- environment ------------------------------------------------------------------------------

CONFIG_VARIABLE = "EAGLE_CONFIG"
# Variables read besides one per setting; EAGLE_TEST_* belong to the test suite, EAGLE_SERVER
# and EAGLE_TOKEN to the eagle-chat client.
EXTRA_VARIABLES = (CONFIG_VARIABLE, "EAGLE_SERVER", "EAGLE_TOKEN")

# What kubelet injects for every Service with a cluster IP in the pod's namespace (unless the
# pod sets enableServiceLinks: false), with <NAME> the Service's name upper-cased, '-' as '_':
# <NAME>_SERVICE_HOST=<ip>, <NAME>_SERVICE_PORT=<port>, <NAME>_SERVICE_PORT_<PORT NAME>=<port>,
# <NAME>_PORT=<proto>://<ip>:<port>, and per port <NAME>_PORT_<port>_<PROTO>=<proto>://...
# with _PROTO=<proto>, _PORT=<port> and _ADDR=<ip> beside it. A Service named `eagle-...`
# thus writes EAGLE_* variables; each shape is matched with the value it must carry.
_PROTO = r"(TCP|UDP|SCTP)"
_URL = re.compile(r"^(tcp|udp|sctp)://\[?[0-9A-Fa-f.:]+\]?:\d{1,5}$")
_NUMBER = re.compile(r"^\d{1,5}$")
_LINK_SHAPES = (
    (re.compile(r"^\w+_SERVICE_HOST$"), "ip"),
    (re.compile(r"^\w+_SERVICE_PORT(_\w+)?$"), "number"),
    (re.compile(rf"^\w+_PORT_\d{{1,5}}_{_PROTO}$"), "url"),
    (re.compile(rf"^\w+_PORT_\d{{1,5}}_{_PROTO}_PROTO$"), "proto"),
    (re.compile(rf"^\w+_PORT_\d{{1,5}}_{_PROTO}_PORT$"), "number"),
    (re.compile(rf"^\w+_PORT_\d{{1,5}}_{_PROTO}_ADDR$"), "ip"),
    (re.compile(r"^\w+_PORT$"), "url"),
)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def service_link(name: str, value: str) -> bool:
    """Whether `name=value` is a Kubernetes service-link variable: its name has one of the
    injected shapes and its value the form that shape carries. EAGLE_PORT=tcp://10.0.0.1:50051
    (a Service named `eagle`) is one; EAGLE_PORT=50051 is the port setting."""
    for shape, kind in _LINK_SHAPES:
        if shape.match(name):
            return {"ip": _is_ip(value), "number": bool(_NUMBER.match(value)),
                    "url": bool(_URL.match(value)),
                    "proto": value in ("TCP", "UDP", "SCTP", "tcp", "udp", "sctp")}[kind]
    return False


def variable_names() -> set[str]:
    return {variable(f) for f in fields(Settings)} | set(EXTRA_VARIABLES)


def check_variables(env: dict[str, str]) -> list[str]:
    """Refuse an EAGLE_* variable that names no setting (a typo that would be ignored), and
    return the service-link variables Kubernetes injected, which are set aside."""
    known = variable_names()
    links = sorted(k for k, v in env.items() if k.startswith("EAGLE_") and service_link(k, v))
    unknown = sorted(k for k in env if k.startswith("EAGLE_") and k not in known
                     and k not in links and not k.startswith("EAGLE_TEST_"))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise ValueError(f"unknown setting variable{'s' if len(unknown) > 1 else ''}: "
                         f"{', '.join(hints)}; every EAGLE_* variable must name a setting "
                         f"(`eagle-serve --help` lists them)")
    return links


# -- values -----------------------------------------------------------------------------------

def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _convert(kind: type, text: str) -> object:
    if kind is bool:
        return _parse_bool(text)
    if kind is tuple:
        return tuple(p for p in text.split(os.pathsep) if p)
    return kind(text)


def _kind(f: Field) -> type:
    return type(f.default)


def _from_file(f: Field, value: object, where: str) -> object:
    """A TOML value checked against the setting's type (an integer is a float too)."""
    kind = _kind(f)
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, list) and all(isinstance(v, str) for v in value) if kind is tuple
          else isinstance(value, str))
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a number",
                tuple: "a list of strings", str: "a string"}[kind]
        raise ValueError(f"{where}: {f.name} = {value!r} is not {want}")
    return tuple(value) if kind is tuple else kind(value)


def read_config(path: str) -> dict[str, object]:
    """The settings a TOML file sets: top-level keys named as the settings (snake_case), or
    the same keys under one table per group ([model], [engine], ...), as --print-config writes
    them. Unknown keys and the token itself (it belongs in a Secret) are refused."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"the config file {path!r} cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"the config file {path!r} is not TOML: {exc}") from None
    by_name = {f.name: f for f in fields(Settings)}
    flat: dict[str, object] = {}
    for key, value in raw.items():
        if key in GROUPS and isinstance(value, dict):
            for inner, v in value.items():
                flat[inner] = v
        else:
            flat[key] = value
    values: dict[str, object] = {}
    for key, value in flat.items():
        f = by_name.get(key)
        if f is None:
            close = difflib.get_close_matches(key, list(by_name) + list(GROUPS), n=1,
                                              cutoff=0.8)
            raise ValueError(f"the config file {path!r}: unknown key {key!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else "")
                             + "; `eagle-serve --help` lists the settings")
        if f.metadata["secret"]:
            raise ValueError(f"the config file {path!r}: {key} does not belong in a config "
                             f"file; put the token in a Secret and name it with "
                             f"auth_token_file")
        values[key] = _from_file(f, value, f"the config file {path!r}")
    return values


# -- the command line -------------------------------------------------------------------------

class _Help(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


DESCRIPTION = """\
Serve NVIDIA's Eagle2 vision-language models over gRPC (eagle.v1.ChatService).

Every setting below is a flag, an EAGLE_<NAME> environment variable (e.g. --max-running is
EAGLE_MAX_RUNNING) and a key of the TOML config file (max_running). Precedence, highest
first: flags, then environment variables, then the config file, then the defaults.
Units are in the names: _s seconds, _ms milliseconds, _mb MiB, _bytes bytes."""

EPILOG = """\
examples:
  eagle-serve --model /models/Eagle2-1B --device cuda --host 0.0.0.0 --insecure
  eagle-serve --config /etc/eagle/server.toml --port 50052
  eagle-serve --config /etc/eagle/server.toml --print-config

docs/settings.md has this list with more on each; docs/operations.md how to size the KV
cache and the token budget."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eagle-serve", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=_Help,
                                usage="eagle-serve [--config FILE] [--print-config] "
                                      "[--SETTING VALUE ...]")
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"TOML file of settings (env {CONFIG_VARIABLE}); below flags and "
                        f"variables")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective settings as a config file (secrets redacted) "
                        "and exit")
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    for f in fields(Settings):
        group = groups[f.metadata["group"]]
        text = (f"{f.metadata['help']} [default {default_text(f)}; env "
                f"{variable(f)}]").replace("%", "%%")
        metavar = ("BOOL" if _kind(f) is bool else "N" if _kind(f) is int else
                   "SECONDS" if f.name.endswith("_s") or f.name == "grace_seconds" else
                   "X" if _kind(f) is float else "DIR" if f.name == "media_roots" else "TEXT")
        if f.name == "media_roots":
            group.add_argument(flag(f), dest=f.name, action="append", default=None,
                               metavar=metavar, help=text)
        elif _kind(f) is bool:
            group.add_argument(flag(f), dest=f.name, default=None, type=_parse_bool, nargs="?",
                               const=True, metavar=metavar, help=text)
        else:
            group.add_argument(flag(f), dest=f.name, default=None, type=_kind(f),
                               metavar=metavar, help=text)
    return p


# -- loading ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Loaded:
    """The settings, and what the start-up log should say about where they came from."""

    settings: Settings
    ignored_variables: tuple[str, ...] = ()  # Kubernetes service links, set aside
    config_file: str = ""
    print_config: bool = False


def load_all(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Loaded:
    """Defaults, then the config file, then EAGLE_* variables, then flags; the token from
    auth_token_file (a mounted Secret) when one is named."""
    env = dict(os.environ if env is None else env)
    links = check_variables(env)
    args = parser().parse_args(argv)
    values: dict[str, object] = {}
    config = args.config or env.get(CONFIG_VARIABLE, "")
    if config:
        values.update(read_config(config))
    for f in fields(Settings):
        name = variable(f)
        raw = env.get(name)
        if raw is not None and name not in links:
            try:
                values[f.name] = _convert(_kind(f), raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a valid "
                                 f"{_kind(f).__name__}") from None
    for f in fields(Settings):
        value = getattr(args, f.name)
        if value is not None:
            values[f.name] = tuple(value) if f.name == "media_roots" else value
    token_file = values.get("auth_token_file", "")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"the auth token file {token_file!r} cannot be read "
                             f"({exc.strerror})") from None
        if not token:
            raise ValueError(f"the auth token file {token_file!r} is empty")
        values["auth_token"] = token
    settings = Settings(**values)
    settings.check()
    return Loaded(settings, tuple(links), config, args.print_config)


def load(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    return load_all(argv, env).settings


# -- writing it down --------------------------------------------------------------------------

def _toml_value(value: object) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's


def to_toml(s: Settings) -> str:
    """The settings as a config file, one table per group, each key with its description;
    the token is never written (auth_token_file names where it comes from)."""
    lines = ["# eagle-serve settings (eagle-serve --print-config); load with --config FILE"]
    for key, title in GROUPS.items():
        lines += ["", f"[{key}]  # {title}"]
        for f in fields(Settings):
            if f.metadata["group"] != key:
                continue
            lines.append(f"# {f.metadata['help']}")
            value = getattr(s, f.name)
            if f.metadata["secret"]:
                lines.append(f"# {f.name} = (redacted{', set' if value else ', empty'}: "
                             f"name a file with auth_token_file)")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def markdown() -> str:
    """docs/settings.md: every setting by group, with its flag, variable and default."""
    out = ["# Settings reference", "",
           "Generated from `service/settings.py` by `python -m service.settings --markdown` "
           "(a test fails when this file is stale). Every setting is a flag, an `EAGLE_*` "
           "environment variable and a key of the TOML config file (`--config FILE` or "
           "`EAGLE_CONFIG`); precedence, highest first: flags, variables, the config file, "
           "the defaults. `eagle-serve --print-config` prints the effective settings as a "
           "config file. Kubernetes' service-link variables (`<SERVICE>_PORT=tcp://...` and "
           "the like) are recognised and ignored, with one log line naming them."]
    for key, title in GROUPS.items():
        out += ["", f"## {title}", "", "| flag / variable / key | default | what it sets |",
                "|---|---|---|"]
        for f in fields(Settings):
            if f.metadata["group"] == key:
                cell = f"`{flag(f)}`<br>`{variable(f)}`<br>`{f.name}`"
                out.append(f"| {cell} | {default_text(f)} | {f.metadata['help']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.settings")
    p.add_argument("--markdown", action="store_true", help="print docs/settings.md")
    args = p.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
