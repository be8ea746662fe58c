"""Typed server settings from flags and EAGLE_* environment variables, built once at start-up."""
from __future__ import annotations

import argparse
import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

MiB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Every knob of the server, with its default. Flags override EAGLE_<NAME> variables."""

    host: str = "127.0.0.1"
    port: int = 50051
    model: str = "tiny"
    device: str = "auto"  # auto, cpu, cuda, cuda:N (one process per GPU)
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32
    context_length: int = 0  # 0: the config's max_position_embeddings (see README)
    # the prompt and frame sampler for checkpoints that ship neither chat_template.json nor
    # processor_config.json: auto (by layout), eagle2 (the worker's), eagle2.5 (the processor's)
    prompt_style: str = "auto"
    cache_dir: str = ""
    # capacity
    max_running: int = 16
    max_queue: int = 64
    max_batch_tokens: int = 262_144
    # stall-free prefill: prompts over chunk_above tokens are prefilled a chunk per decode
    # step, each as large as the per-iteration token budget leaves after the running rows
    # (0: the device's measured default, 256 on CPU, 2048 on CUDA); chunk_above 0: never
    token_budget: int = 0
    chunk_above: int = 4096
    # the KV cache: a pool of kv_cache_mb (0: a quarter of free RAM on CPU, the GPU's free
    # memory after weights less a reserve on CUDA; see README) in blocks of kv_block_size
    # tokens; prefix_cache shares full blocks between requests whose prompts start alike
    kv_cache_mb: int = 0
    kv_block_size: int = 16
    prefix_cache: bool = True
    # decode attention: gather (SDPA over gathered blocks) or flex (FlexAttention over the
    # pool with a paged block mask, compiled on CUDA); see README "Running on a GPU"
    attention: str = "gather"
    preprocess_workers: int = 2
    max_concurrent_rpcs: int = 0  # 0: running + queued + 64 (health watches, model info)
    default_deadline_s: float = 600.0  # for calls that come without a deadline
    step_timeout_s: float = 120.0  # a model step longer than this: unhealthy, exit 3
    video_workers: int = 2  # decoder processes (killed and replaced on a hang or crash)
    video_memory_mb: int = 4096  # address-space limit of each decoder process
    engine_process: bool = True  # the model in a child process (its own GIL); see README
    # the engine process is restarted when it dies, unless it dies more than this many times
    # within the window: a crash loop, and the server exits 3 for its supervisor
    engine_restarts: int = 3
    engine_restart_window_s: float = 300.0
    # limits per request
    max_request_bytes: int = 64 * MiB
    max_messages: int = 64
    max_parts: int = 128
    max_text_chars: int = 200_000
    max_images: int = 16
    max_image_bytes: int = 20 * MiB
    max_image_pixels: int = 64_000_000
    max_tiles_per_image: int = 40
    max_videos: int = 4
    max_video_frames: int = 0  # 0: the model's (64 for Eagle2, 256 for Eagle2.5)
    default_video_frames: int = 0  # 0: the model's (32 for Eagle2, 256: its 2 fps rule)
    max_video_bytes: int = 512 * MiB
    max_video_seconds: float = 3 * 3600.0
    video_timeout_s: float = 60.0
    # JPEGs decoded by nvJPEG and tiled on the GPU when the model is on CUDA
    device_decode: bool = True
    # videos decoded by the GPU's NVDEC (FFmpeg's cuvid through PyAV) when the model is on
    # CUDA; off until measured on a GPU (bench/gpu.sh times both)
    video_nvdec: bool = False
    max_new_tokens: int = 4096
    default_max_new_tokens: int = 512
    default_temperature: float = 0.0
    # media references
    media_roots: tuple[str, ...] = ()
    allow_urls: bool = False
    # security
    # one bearer token, or several (comma- or newline-separated, e.g. one per line of the
    # token file): one per tenant, each with its own prefix-cache namespace
    auth_token: str = field(default="", repr=False)
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    insecure: bool = False
    # operations
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    grace_seconds: float = 30.0
    drain_delay_s: float = 1.0  # on SIGTERM: refuse new calls this long before closing the port
    warmup: bool = True
    gil_switch_ms: float = 0.5  # sys.setswitchinterval for the server process
    ledger_file: str = ""  # append accepted/terminal records of every RPC (soak tests)
    log_format: str = "json"
    log_level: str = "INFO"
    # Connections are closed after this age (gRPC adds +-10% jitter) so long-lived clients
    # re-resolve and rebalance over the replicas; calls in flight get the grace to finish.
    # 0 turns it off.
    max_connection_age_s: float = 300.0
    max_connection_age_grace_s: float = 600.0
    # A plaintext port serving only grpc.health.v1, for Kubernetes' gRPC probes when the main
    # port has TLS (the probes cannot do TLS). 0: none.
    health_port: int = 0
    keepalive_time_ms: int = 60_000
    keepalive_timeout_ms: int = 20_000
    min_ping_interval_ms: int = 10_000
    max_ping_strikes: int = 2

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    def describe(self) -> dict[str, object]:
        """The settings for the start-up log, secrets masked."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "auth_token":
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


def _kind(default: object) -> type:
    return type(default)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eagle-serve", description="Serve Eagle2 over gRPC.")
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.name == "media_roots":
            p.add_argument("--media-root", dest="media_roots", action="append", default=None,
                           help="folder that video/image references may point into (repeatable)")
        elif isinstance(default, bool):
            p.add_argument(flag, dest=f.name, default=None, type=_parse_bool, nargs="?",
                           const=True, help=f"(default {default}; env EAGLE_{f.name.upper()})")
        else:
            p.add_argument(flag, dest=f.name, default=None, type=_kind(default),
                           help=f"(default {default!r}; env EAGLE_{f.name.upper()})")
    p.add_argument("--auth-token-file", default=None,
                   help="file holding the bearer token, e.g. a mounted Secret (safer than a "
                        "flag or variable; env EAGLE_AUTH_TOKEN_FILE)")
    return p


# Variables read besides one per setting; EAGLE_TEST_* belong to the test suite, EAGLE_SERVER
# and EAGLE_TOKEN to the eagle-chat client.
EXTRA_VARIABLES = ("EAGLE_AUTH_TOKEN_FILE", "EAGLE_SERVER", "EAGLE_TOKEN")


def variable_names() -> set[str]:
    return {f"EAGLE_{f.name.upper()}" for f in fields(Settings)} | set(EXTRA_VARIABLES)


def check_variables(env: dict[str, str]) -> None:
    """An EAGLE_* variable that names no setting is a typo that would be ignored: refuse it."""
    known = variable_names()
    unknown = sorted(k for k in env if k.startswith("EAGLE_") and k not in known
                     and not k.startswith("EAGLE_TEST_"))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise ValueError(f"unknown setting variable{'s' if len(unknown) > 1 else ''}: "
                         f"{', '.join(hints)}; every EAGLE_* variable must name a setting "
                         f"(`eagle-serve --help` lists them)")


def load(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Defaults, then EAGLE_* variables, then flags. The token may come from a file (a
    mounted Secret) named by --auth-token-file or EAGLE_AUTH_TOKEN_FILE."""
    env = dict(os.environ if env is None else env)
    check_variables(env)
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = env.get(f"EAGLE_{f.name.upper()}")
        if raw is not None:
            try:
                values[f.name] = _convert(_kind(f.default), raw)
            except ValueError:
                raise ValueError(f"EAGLE_{f.name.upper()}={raw!r} is not a valid "
                                 f"{_kind(f.default).__name__}") from None
    args = parser().parse_args(argv)
    for f in fields(Settings):
        value = getattr(args, f.name)
        if value is not None:
            values[f.name] = tuple(value) if f.name == "media_roots" else value
    token_file = args.auth_token_file or env.get("EAGLE_AUTH_TOKEN_FILE", "")
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
    return settings
