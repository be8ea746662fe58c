"""JPEG tiled on the model's device (preprocess.device_tiles): its steps run here on a CPU
device (libjpeg-turbo instead of nvJPEG), checked against the CPU path; the CUDA run of the
same comparison is in test_gpu.py."""
from __future__ import annotations

import factory
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from preprocess import device_tiles, tiler
from preprocess.errors import MediaError
from preprocess.media import decode_image, open_image
from service.engine.job import (
    ChatJob,
    ChatMessage,
    ImagePart,
    Role,
    SamplingParams,
    TextPart,
    VisionParams,
)
from service.engine.prepare import MediaSettings, Preparer
from service.engine.processor_prompt import ProcessorPrompt

CPU = torch.device("cpu")


def cpu_tiles(data: bytes, cap: int) -> np.ndarray:
    """The CPU path with the kernel the device path has: the Eagle2.5 processor's."""
    return tiler.split_tiles(decode_image(data), max_tiles=cap, kernel="torch")


def _exif_jpeg(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return factory.encode(im, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_equals_pillows_exif_transpose(orientation: int) -> None:
    arr = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    im.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(im))
    got = device_tiles.orient(torch.from_numpy(arr).permute(2, 0, 1), orientation)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("size, cap", [((4032, 3024), 12), ((1275, 1650), 12), ((300, 200), 6),
                                       ((600, 6000), 12), ((448, 448), 12)])
def test_tiles_match_the_cpu_path(size: tuple[int, int], cap: int) -> None:
    data = factory.encode(factory.photo(*size), "JPEG", quality=92)
    ours = device_tiles.jpeg_tiles(data, 1, device=CPU, max_tiles=cap)
    ref = cpu_tiles(data, cap)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == ref.shape
    # the same libjpeg-turbo decode and the same uint8 kernel on a CPU device: equal bytes
    assert np.array_equal(ours.numpy(), ref)


def test_an_exif_rotated_photo_is_tiled_upright() -> None:
    stored = factory.photo(900, 500)
    data = _exif_jpeg(stored, 6)  # shown rotated 90 degrees clockwise: 500 x 900
    opened = open_image(data)
    assert opened.size == (500, 900)
    ours = device_tiles.jpeg_tiles(data, opened.orientation, device=CPU, max_tiles=12)
    ref = cpu_tiles(data, 12)
    assert np.array_equal(ours.numpy(), ref)


def test_only_rgb_and_grey_jpegs_take_the_device_path() -> None:
    assert device_tiles.usable("JPEG", "RGB") and device_tiles.usable("JPEG", "L")
    assert not device_tiles.usable("JPEG", "CMYK")
    assert not device_tiles.usable("PNG", "RGB")


def test_device_tiles_normalise_like_the_cpu_arrays() -> None:
    tiles = device_tiles.jpeg_tiles(factory.encode(factory.photo(800, 600), "JPEG"), 1,
                                    device=CPU, max_tiles=6)
    for norm in ("siglip", "imagenet"):
        assert torch.equal(tiler.normalize(tiles, norm), tiler.normalize(tiles.numpy(), norm))


def _job(*images: bytes) -> ChatJob:
    parts = tuple(ImagePart(data=d, field=f"messages[0].content[{k}]")
                  for k, d in enumerate(images))
    return ChatJob("r", (ChatMessage(Role.USER, (*parts, TextPart("Describe."))),),
                   SamplingParams(max_new_tokens=8), VisionParams(max_tiles_per_image=6))


def test_the_preparer_tiles_jpegs_on_its_device_and_the_rest_on_the_cpu(tiny) -> None:
    jpeg = factory.encode(factory.photo(800, 600), "JPEG")
    cmyk = factory.encode(factory.photo(640, 480).convert("CMYK"), "JPEG")
    png = factory.encode(factory.document(500, 700), "PNG")
    style = ProcessorPrompt(tiny.tokenizer)  # torch's resize: the device path's kernel
    on_device = Preparer(tiny.tokenizer, tiny.cfg, 16384, MediaSettings(), device=CPU,
                         style=style)
    on_cpu = Preparer(tiny.tokenizer, tiny.cfg, 16384, MediaSettings(), style=style)
    a, b = on_device(_job(jpeg, cmyk, png)), on_cpu(_job(jpeg, cmyk, png))
    assert [type(g.tiles) for g in a.groups] == [torch.Tensor, np.ndarray, np.ndarray]
    assert a.ids == b.ids and a.image_tiles == b.image_tiles == 7 + 7 + 7
    assert np.array_equal(a.groups[0].tiles.numpy(), b.groups[0].tiles)
    assert all(np.array_equal(x.tiles, y.tiles) for x, y in zip(a.groups[1:], b.groups[1:]))
    off = Preparer(tiny.tokenizer, tiny.cfg, 16384, MediaSettings(device_decode=False),
                   device=CPU, style=style)
    assert off.device is None and isinstance(off(_job(jpeg)).groups[0].tiles, np.ndarray)
    # the Eagle2 worker's style resizes with Pillow, which has no device kernel: the CPU
    worker = Preparer(tiny.tokenizer, tiny.cfg, 16384, MediaSettings(), device=CPU)
    assert isinstance(worker(_job(jpeg)).groups[0].tiles, np.ndarray)


def test_a_damaged_jpeg_gets_the_cpu_paths_error(tiny) -> None:
    data = factory.encode(factory.photo(800, 600), "JPEG")
    broken = data[: len(data) // 2]
    prep = Preparer(tiny.tokenizer, tiny.cfg, 16384, MediaSettings(), device=CPU)
    with pytest.raises(MediaError) as err:
        prep(_job(data, broken))
    assert str(err.value).startswith("image 2: the JPEG data is damaged or truncated")
    assert err.value.field == "messages[0].content[1]"


def test_a_groups_pixel_values_by_slice_equal_the_whole_ones_sliced() -> None:
    from service.engine.prepare import VisionGroup

    tiles = tiler.split_tiles(factory.photo(900, 600), max_tiles=6)
    for group in (VisionGroup("a", tiles), VisionGroup("b", torch.from_numpy(tiles))):
        whole = group.pixel_values("siglip", CPU, torch.float32)
        assert whole.shape == (7, 3, 448, 448)
        assert torch.equal(group.pixel_values("siglip", CPU, torch.float32, 2, 5), whole[2:5])
        assert group.pixel_values("siglip", CPU, torch.bfloat16, 6).dtype == torch.bfloat16
