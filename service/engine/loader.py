"""Load an Eagle2 checkpoint (folder or cached hub id) into Eagle2Model, strictly and once."""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from service.engine import mob as mob_module
from service.engine.config import EagleConfig, ModelLoadError, read_config
from service.engine.keys import official_names
from service.engine.model import Eagle2Model

log = logging.getLogger(__name__)

# Checkpoint tensors that exist in some releases and that inference never uses: SigLIP's
# pooling head, and the towers' classifier heads of Eagle2-9B.
_UNUSED = re.compile(r"^vision_model\.vision_model\."
                     r"(vision_towers\.\d+\.vision_tower\.(vision_model\.)?)?head\.")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class LoadedModel:
    """A model ready to run, with its tokenizer, config and where it came from."""

    model: Eagle2Model
    tokenizer: PreTrainedTokenizerBase
    cfg: EagleConfig
    folder: Path
    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return self.folder.name


def resolve_model(ref: str, cache_dir: Path | None = None) -> Path:
    """`tiny`, a checkpoint folder, or a hub id already in the local cache -> a folder."""
    if ref.startswith("tiny"):
        from service.engine.tiny import VARIANTS, ensure_tiny

        if ref in VARIANTS:
            return ensure_tiny(cache_dir, ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if _HUB_ID.match(ref):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(repo_id=ref, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise ModelLoadError(
                f"model {ref!r} is not in the local Hugging Face cache and this server never "
                f"downloads; fetch it first (`hf download {ref}`) or pass a folder") from None
    raise ModelLoadError(f"model {ref!r} is neither 'tiny', a folder, nor a hub id (org/name)")


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(requested: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`auto`: CUDA when present, else CPU; `cuda:N` names one GPU of several. The dtype
    `auto` is bfloat16 on CUDA and float32 on CPU; `bfloat16`, `float16`, `float32` force one."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ModelLoadError(f"--device {requested!r} is not a device: use auto, cpu, cuda or "
                             f"cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"--device {requested!r}: only cpu and cuda are served")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {requested} was asked for but no CUDA device is "
                                 f"visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {requested}: this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s), numbered from 0")
        if device.index is None:  # `cuda` names the current device: made explicit, since
            device = torch.device("cuda", torch.cuda.current_device())  # that is per thread
    if dtype == "auto":
        return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return device, DTYPES[dtype]


def attention_backend(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def build_empty(cfg: EagleConfig, attn: str = "sdpa") -> Eagle2Model:
    """The module tree with parameters on the meta device (no memory) and real buffers."""
    cfg.text._attn_implementation = attn
    cfg.vision._attn_implementation = attn if attn != "flash_attention_2" else "sdpa"
    with init_empty_weights(include_buffers=False):
        return Eagle2Model(cfg)


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [folder / f for f in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise ModelLoadError(f"{folder} has neither model.safetensors nor "
                         f"model.safetensors.index.json")


def check_keys(model: Eagle2Model, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Compare checkpoint key shapes with the module; returns official -> module names.

    Raises ModelLoadError naming every missing, unexpected or mis-shaped key.
    """
    to_official = official_names(model, shapes.keys())
    to_module = {v: k for k, v in to_official.items()}
    params = dict(model.named_parameters())
    present = {k for k in shapes if not _UNUSED.match(k)}
    if model.cfg.tie_word_embeddings:
        present.discard("language_model.lm_head.weight")
    missing = sorted(set(to_module) - present)
    unexpected = sorted(present - set(to_module))
    wrong = [f"{k} is {list(shapes[k])}, expected {list(params[to_module[k]].shape)}"
             for k in sorted(present & set(to_module))
             if tuple(shapes[k]) != tuple(params[to_module[k]].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_few(wrong)}")
    if problems:
        raise ModelLoadError("the checkpoint does not match its config: " + "; ".join(problems))
    return to_module


class _ForeignConfigNotice(logging.Filter):
    """transformers reads the checkpoint's config to find the tokenizer and says, on every
    load, that an `eagle_chat` config is not a model type it knows: true, and no news here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "to instantiate a model of type" not in record.getMessage()


logging.getLogger("transformers.configuration_utils").addFilter(_ForeignConfigNotice())


def load_model(folder: Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Read config, tokenizer and safetensors from `folder` into a model on the chosen device
    and dtype (see pick_device)."""
    cfg = read_config(folder)
    dev, dtype = pick_device(device, dtype)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)  # streams, graphs and allocations of this thread go there
    files = checkpoint_files(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    sizes_from_tensors(cfg, shapes)
    model = build_empty(cfg, attention_backend(dev))
    check_memory(model, dev, dtype)  # before a byte of the weights is read
    to_module = check_keys(model, shapes)
    state = {}
    for file in files:  # tensors go straight to their device and dtype, shard by shard
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in to_module:
                    name = to_module[key]
                    state[name] = f.get_tensor(key).to(
                        device=dev, dtype=mob_module.param_dtype(name, dtype))
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.language_model.get_output_embeddings().weight = model.embed_tokens.weight
    model.to(dev).eval()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ModelLoadError(f"parameters left unloaded: {_few(still_meta)}")
    try:  # never the checkpoint's own code, and never a question on a terminal
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: the tokenizer files cannot be read ({exc})") from None
    log.info("loaded %s (%s) on %s in %s", folder.name, cfg.model_type, dev, dtype)
    return LoadedModel(model, tokenizer, cfg, folder, dev, dtype)


_EMBED = "language_model.model.embed_tokens.weight"


def sizes_from_tensors(cfg: EagleConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """The vocabulary from the embedding's rows: a finetune may resize it, and the 8B's config
    and tokenizer can disagree with its tensors (shared/reference/eagle-family.md)."""
    rows = shapes.get(_EMBED, (0,))[0]
    if rows and rows != cfg.text.vocab_size:
        log.warning("the checkpoint's embeddings have %d rows, its config says vocab_size %d: "
                    "following the tensors", rows, cfg.text.vocab_size)
        cfg.text.vocab_size = rows


def available_memory(device: torch.device) -> int:
    """Bytes free for the weights: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(model: Eagle2Model, device: torch.device, dtype: torch.dtype,
                 headroom: float = 1.05) -> None:
    """Refuse, before allocating, a model whose weights cannot fit the device, with sizes."""
    named = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    params = sum(p.numel() for _, p in named)
    need = sum(p.numel() * torch.tensor([], dtype=mob_module.param_dtype(n, dtype)).element_size()
               for n, p in named)
    have = available_memory(device)
    if need * headroom > have:
        raise ModelLoadError(
            f"the model needs {need / 2**30:.1f} GiB for its {params / 1e9:.2f}B parameters in "
            f"{str(dtype)[6:]}, and {device} has {have / 2**30:.1f} GiB available; use a "
            f"smaller dtype (--dtype bfloat16) or a device with more memory")


def _few(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
