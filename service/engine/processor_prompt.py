"""The eagle_2_5_vl processor's prompt: its chat template, rendered by the tokenizer's own
template support, then its placeholder expansion.

The template writes `<image-N>` / `<video-N>` per content item in order and the default system
message when none is given; the processor turns image N into `<image N><img>` + 256 x tiles
`<IMG_CONTEXT>` + `</img>` (the tag is written even for a single image), and video N into
"The first video sampled with 2.00 fps: " followed, with no separator, by
"Frame 1 sample at 0.00s: <img>...</img>" per frame ("The first video: Frame 1: ..." without
timestamps). Caller text never passes through the template as text: each piece goes in as
a sentinel and comes back as Content, so a caller's "<image-1>" or "<|im_end|>" stays text.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from preprocess.frames import FpsSampling
from service.engine.job import ChatMessage, ImagePart, ModelLoadError, Role, TextPart, VideoPart
from service.engine.prompt import (
    Content,
    Segment,
    Slot,
    Template,
    WorkerPrompt,
    merge_templates,
)

ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
            "ninth", "tenth"]
# Used when a checkpoint of this layout ships no chat_template.json: the same output as
# Eagle2.5's own template for what this server sends (a default system message, content
# items in order, an open assistant turn).
BUILTIN_TEMPLATE = (
    "{% set n = namespace(image=0, video=0) %}"
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{% set n.image = n.image + 1 %}<image-{{ n.image }}>"
    "{% elif c['type'] == 'video' %}{% set n.video = n.video + 1 %}<video-{{ n.video }}>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_SENTINEL = "\x00{}\x00"
_PIECE = re.compile(r"\x00(\d+)\x00|<(image|video)-(\d+)>")


@dataclass(frozen=True)
class SampledVideo:
    """What the prompt needs of a decoded video: its frame times and sampling rate."""

    times: list[float]
    fps: float = 0.0


def chat_template(folder: Path) -> str | None:
    """The processor's chat template of a checkpoint folder (chat_template.json, or the
    `chat_template` of processor_config.json), or None."""
    for name in ("chat_template.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            template = json.loads(path.read_text()).get("chat_template")
            if isinstance(template, str) and template:
                return template
    return None


STYLES = ("auto", "eagle2", "eagle2.5")
# Frame limits by style: (most per video, default per video). Eagle2.5 samples at 2 fps up to
# 256 frames (512 in its Video-MME setting: allow it with --max-video-frames).
FRAME_LIMITS = {"eagle2": (64, 32), "eagle2.5": (256, 256)}


def resolve_style(folder: Path, model_type: str, setting: str = "auto") -> str:
    """`eagle2.5` (the processor's prompt and frame sampler) for a checkpoint that ships
    chat_template.json or processor_config.json, `eagle2` (the upstream worker's) for one
    that ships neither, unless `setting` names a style; `auto` falls back on the layout
    (eagle_2_5_vl -> eagle2.5, eagle_chat -> eagle2)."""
    if setting not in STYLES:
        raise ModelLoadError(f"--prompt-style {setting!r} is not one of {', '.join(STYLES)}")
    ships = any((folder / n).is_file() for n in ("chat_template.json", "processor_config.json"))
    if ships:
        return "eagle2.5"
    if setting != "auto":
        return setting
    return "eagle2.5" if model_type == "eagle_2_5_vl" else "eagle2"


def make_style(name: str, tokenizer, folder: Path):
    """The prompt style object the media stage uses (WorkerPrompt or ProcessorPrompt)."""
    if name == "eagle2":
        return WorkerPrompt()
    return ProcessorPrompt(tokenizer, chat_template(folder))


class ProcessorPrompt:
    """Segments of a conversation as the checkpoint's processor writes it; its frames are
    sampled by the processor's rule (FpsSampling)."""

    worst_frame_line = "Frame 9999 sample at 99999.99s: "
    sampling = FpsSampling()
    resize_kernel = "torch"  # its fast image processor: torchvision's F.resize on tensors

    def __init__(self, tokenizer, template: str | None = None) -> None:
        self.tok = tokenizer
        self.template = template or BUILTIN_TEMPLATE

    def conversation(self, messages: tuple[ChatMessage, ...] | list[ChatMessage],
                     videos: list[SampledVideo], *, timestamps: bool = True) -> list[Segment]:
        """Segments ending with the assistant's open turn; `videos[v]` holds video v's frame
        times (one frame slot each) and the rate they were sampled at."""
        texts: list[str] = []

        def sentinel(text: str) -> str:
            texts.append(text)
            return _SENTINEL.format(len(texts) - 1)

        convo = []
        for msg in messages:
            if msg.role is Role.SYSTEM:
                content: object = sentinel("".join(p.text for p in msg.parts
                                                   if isinstance(p, TextPart)))
            else:
                content = [{"type": "text", "text": sentinel(p.text)} if isinstance(p, TextPart)
                           else {"type": "image" if isinstance(p, ImagePart) else "video"}
                           for p in msg.parts if isinstance(p, TextPart | ImagePart | VideoPart)]
            convo.append({"role": msg.role.value, "content": content})
        rendered = self.tok.apply_chat_template(convo, chat_template=self.template,
                                                tokenize=False, add_generation_prompt=True)
        segs: list[Segment] = []
        at = 0
        for match in _PIECE.finditer(rendered):
            if match.start() > at:
                segs.append(Template(rendered[at:match.start()]))
            at = match.end()
            if match.group(1) is not None:
                segs.append(Content(texts[int(match.group(1))]))
            elif match.group(2) == "image":
                number = int(match.group(3))
                segs += [Template(f"<image {number}>"), Slot(image=number - 1)]
            else:
                segs += self._video(int(match.group(3)) - 1, videos, timestamps)
        if at < len(rendered):
            segs.append(Template(rendered[at:]))
        return merge_templates(segs)

    @staticmethod
    def _video(v: int, videos: list[SampledVideo], timestamps: bool) -> list[Segment]:
        ordinal = ORDINALS[v] if v < len(ORDINALS) else f"{v + 1}th"
        video = videos[v]
        head = f"The {ordinal} video sampled with {video.fps:.2f} fps: " if timestamps \
            else f"The {ordinal} video: "
        segs: list[Segment] = [Template(head)]
        for i, t in enumerate(video.times):
            line = f"Frame {i + 1} sample at {t:.2f}s: " if timestamps else f"Frame {i + 1}: "
            segs += [Template(line), Slot(video=v, frame=i)]
        return segs


__all__ = ["BUILTIN_TEMPLATE", "FRAME_LIMITS", "STYLES", "ProcessorPrompt", "SampledVideo",
           "chat_template", "make_style", "resolve_style"]
