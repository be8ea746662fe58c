"""The qwen2-chat prompt as the upstream worker renders it, from ordered message parts.

A conversation becomes a list of segments: template text (role markers, image numbering,
frame lines), content text written by the caller, and vision slots. Caller text is
tokenised with special tokens split, so "<|im_end|>" typed by a user stays text and can
never forge a turn or an image slot; vision slots become <img> + 256*tiles <IMG_CONTEXT>
+ </img> by id, so their count always matches the vision embeddings.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from tokenizers import Tokenizer

from service.engine.job import ChatMessage, ImagePart, Role, TextPart, VideoPart

DEFAULT_SYSTEM = "You are a helpful assistant."
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclass(frozen=True)
class Template:
    """Text the server writes (role markers, numbering); special tokens in it are real."""

    text: str


@dataclass(frozen=True)
class Content:
    """Text the caller wrote; special-token strings in it are plain text."""

    text: str


@dataclass(frozen=True)
class Slot:
    """Where one image's tiles, or one video frame, go. `image` counts all images in order."""

    image: int = -1
    video: int = -1
    frame: int = -1


Segment = Template | Content | Slot


def conversation(messages: tuple[ChatMessage, ...] | list[ChatMessage],
                 frame_times: list[list[float]], *, timestamps: bool = True,
                 default_system: str = DEFAULT_SYSTEM) -> list[Segment]:
    """Segments of the whole prompt, ending with the assistant's open turn.

    `frame_times[v]` holds the sampled times of video v (its length is the frame count).
    Each user message renders its parts in order: an image as "<image k><image>\\n", a video
    as "This is a video:\\n" plus one "Frame i sampled at t seconds: <image>\\n" line per
    frame, text as written. With exactly one image in the conversation (frames count as
    images, as upstream counts them) "<image 1>" is dropped.
    """
    system = default_system
    turns = list(messages)
    if turns and turns[0].role is Role.SYSTEM:
        system = "".join(p.text for p in turns[0].parts if isinstance(p, TextPart))
        turns = turns[1:]
    total_images = (sum(isinstance(p, ImagePart) for m in turns for p in m.parts)
                    + sum(len(t) for t in frame_times))
    numbered = total_images != 1
    segs: list[Segment] = [Template(f"{IM_START}system\n"), Content(system),
                           Template(f"{IM_END}\n")]
    image_no = 0  # upstream numbers images and frames with one counter
    image_idx = video_idx = 0
    for msg in turns:
        segs.append(Template(f"{IM_START}{msg.role.value}\n"))
        for part in msg.parts:
            if isinstance(part, TextPart):
                segs.append(Content(part.text))
            elif isinstance(part, ImagePart):
                image_no += 1
                if numbered:
                    segs.append(Template(f"<image {image_no}>"))
                segs += [Slot(image=image_idx), Template("\n")]
                image_idx += 1
            elif isinstance(part, VideoPart):
                times = frame_times[video_idx]
                segs.append(Template("This is a video:\n"))
                for i, t in enumerate(times):
                    line = f"Frame {i + 1} sampled at {t:.2f} seconds: " if timestamps \
                        else f"Frame {i + 1}: "
                    segs += [Template(line), Slot(video=video_idx, frame=i), Template("\n")]
                image_no += len(times)
                video_idx += 1
        segs.append(Template(f"{IM_END}\n"))
    segs.append(Template(f"{IM_START}assistant\n"))
    return merge_templates(segs)


class WorkerPrompt:
    """The upstream Eagle2 worker's prompt (eagle_chat checkpoints) behind the interface the
    media stage uses for both styles; its frame sampler is the worker's (segment middles)."""

    worst_frame_line = "Frame 9999 sampled at 99999.99 seconds: \n"
    sampling = None
    resize_kernel = "pillow"  # dynamic_preprocess and its transform resize PIL images

    def conversation(self, messages, videos, *, timestamps: bool = True) -> list[Segment]:
        return conversation(messages, [list(v.times) for v in videos], timestamps=timestamps)


def render(segments: list[Segment], image_tiles: list[int], tokens_per_tile: int = 256) -> str:
    """The prompt as one string, vision slots expanded (what the upstream worker feeds in)."""
    out = []
    for seg in segments:
        if isinstance(seg, Slot):
            tiles = image_tiles[seg.image] if seg.image >= 0 else 1
            out.append(IMG_START + IMG_CONTEXT * (tokens_per_tile * tiles) + IMG_END)
        else:
            out.append(seg.text)
    return "".join(out)


class PromptTokenizer:
    """Turns segments into token ids with the tokenizer of the checkpoint. Safe to call from
    several threads at once.

    Template text is tokenised with special tokens recognised, caller text with them split
    into plain pieces. transformers implements `split_special_tokens=` by flipping a flag on
    the one Rust tokenizer before each call, so two media threads tokenising at once could
    swap modes (seen: a template's <|im_start|> split into pieces, which would equally let a
    caller's text through as a real turn marker). So each mode gets its own Rust tokenizer,
    built once with its flag fixed and never changed.
    """

    def __init__(self, tokenizer, image_token_id: int | None = None) -> None:
        self.tok = tokenizer
        backend = tokenizer.backend_tokenizer
        self._template = Tokenizer.from_str(backend.to_str())
        self._template.encode_special_tokens = False
        self._content = Tokenizer.from_str(backend.to_str())
        self._content.encode_special_tokens = True
        ids = tokenizer.convert_tokens_to_ids([IMG_START, IMG_END, IMG_CONTEXT, IM_END])
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError("the tokenizer lacks Eagle's <img>, </img>, <IMG_CONTEXT> or "
                             "<|im_end|> tokens")
        self.img_start, self.img_end, context, self.im_end = ids
        self.img_context = image_token_id if image_token_id is not None else context

    def encode(self, segments: list[Segment], image_tiles: list[int],
               tokens_per_tile: int = 256, namespace: str = "") -> list[int]:
        """The prompt's ids; long text segments' ids are kept per cache `namespace` (the
        job's tenant and cache_salt: how fast a segment tokenizes says nothing about what
        another tenant sent)."""
        ids: list[int] = []
        for seg in segments:
            if isinstance(seg, Slot):
                tiles = image_tiles[seg.image] if seg.image >= 0 else 1
                ids += [self.img_start] + [self.img_context] * (tokens_per_tile * tiles) \
                    + [self.img_end]
            elif seg.text:
                backend = self._content if isinstance(seg, Content) else self._template
                if len(seg.text) < _CACHED_TEXT:
                    ids += backend.encode(seg.text, add_special_tokens=False).ids
                else:
                    ids += _encoded(backend, seg.text, namespace)
        return ids

    def count_text(self, segments: list[Segment], namespace: str = "") -> int:
        """Tokens that are not vision context: everything but the 256*tiles per slot."""
        return len(self.encode(segments, [0] * _count_images(segments), 0, namespace))


# Long texts come back in request after request (a shared system prompt, a conversation's
# history, few-shot examples): their ids are kept, so a prompt whose keys the prefix cache
# holds is not tokenised at length again (twice per request: the budget counts it first).
_CACHED_TEXT = 256  # characters from which a segment's ids are kept


@functools.lru_cache(maxsize=64)  # at most 64 x 200K characters (max_text_chars)
def _encoded(backend: Tokenizer, text: str, namespace: str) -> tuple[int, ...]:
    return tuple(backend.encode(text, add_special_tokens=False).ids)


def _count_images(segments: list[Segment]) -> int:
    return sum(1 for s in segments if isinstance(s, Slot) and s.image >= 0)


def merge_templates(segs: list[Segment]) -> list[Segment]:
    """Join neighbouring template pieces so they are tokenised together, as one string is."""
    out: list[Segment] = []
    for seg in segs:
        if isinstance(seg, Template) and out and isinstance(out[-1], Template):
            out[-1] = Template(out[-1].text + seg.text)
        else:
            out.append(seg)
    return out
