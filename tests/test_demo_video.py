"""The bundled video demo model (moving Fashion-MNIST on ComfyUI's WAN 2.1 class, trained by the project), loaded by
the pack's own node in a real ComfyUI 0.14.1; skipped on the 2024 host (no WAN there)."""
import os
import sys
from typing import NamedTuple, Tuple

import pytest
import torch

import comfy_harness as H
from graph import Graph

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows", "demo_model"))
from fashion_data import garment_crops  # noqa: E402

WAN_DEFAULT = dict(ratio=0.5, importance="cfg", start_percent=0.0, end_percent=1.0, levels="auto",
                   scope="attention")
CLASSES = {"trouser": 1, "bag": 8, "sneaker": 7}


@pytest.fixture(autouse=True)
def _modern(comfy):
    if H.host_kind() != "modern":
        pytest.skip("the video demo model is a WAN model: WAN exists only in current ComfyUI (not on the 2024 host)")


def _nodes():
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


class VideoDemo(NamedTuple):
    loader: str  # node type
    empty: Tuple[str, dict]  # empty latent node type, its inputs (batch size aside)
    codec: str  # codec class in nodes.demo_model (its _stats turn the latent into the gray frame)
    latent_frames: Tuple[int, int, int]  # [T, S, S] of one clip
    decoded: Tuple[int, int]  # (frames, pixels) of a decoded clip


VIDEO_DEMOS = {
    "wan": VideoDemo("ITM_DemoVideoModelLoader", ("EmptyHunyuanLatentVideo", dict(width=256, height=256, length=13)),
                     "DemoVideoCodec", (4, 32, 32), (13, 256)),
    "ltxv": VideoDemo("ITM_DemoLTXVModelLoader", ("EmptyLTXVLatentVideo", dict(width=512, height=512, length=25)),
                      "DemoLTXVCodec", (4, 16, 16), (25, 512)),
    "hunyuan": VideoDemo("ITM_DemoHunyuanModelLoader",
                         ("EmptyHunyuanLatentVideo", dict(width=256, height=256, length=13)),
                         "DemoHunyuanCodec", (4, 32, 32), (13, 256)),
}


def generate(family, prompt_text, merge=None, batch=2, steps=12, seed=5):
    """(decoded frames [B * F, P, P, 3], latent frames as gray [B, T, S, S] in [0, 1]) from one of the bundled video
    demo models (WAN, LTX-Video, HunyuanVideo architecture), loaded by its node."""
    demo = VIDEO_DEMOS[family]
    empty_type, empty_inputs = demo.empty
    g = Graph()
    loader = g.add(demo.loader)
    model = loader[0]
    if merge is not None:
        model = g.add("ITM_ImportanceTokenMerging", model=model, **merge)[0]
    pos = g.add("CLIPTextEncode", text=prompt_text, clip=loader[1])
    neg = g.add("CLIPTextEncode", text="", clip=loader[1])
    empty = g.add(empty_type, batch_size=batch, **empty_inputs)
    sampled = g.add("KSampler", model=model, positive=pos[0], negative=neg[0], latent_image=empty[0], seed=seed,
                    steps=steps, cfg=4.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    decoded = g.add("VAEDecode", samples=sampled[0], vae=loader[2])
    g.add("HostTestImageStats", "frames", images=decoded[0])
    H.run_prompt(g.prompt)
    latent = _nodes()["HostTestLatentStats"].LAST["out"].clone()
    mean, std = getattr(H.pack_module("nodes.demo_model"), demo.codec)._stats(torch.device("cpu"))
    gray = (((latent - mean) / std).mean(dim=1) + 1) / 2
    return _nodes()["HostTestImageStats"].LAST["frames"].clone(), gray.clamp(0, 1)


@pytest.fixture(scope="module")
def classifier():
    from quality.classifier import load_classifier

    return load_classifier()


@pytest.mark.parametrize("merge", [None, WAN_DEFAULT], ids=["unmerged", "merged"])
def test_video_demo_samples_decodes_and_draws_sneakers(comfy, classifier, merge):
    """The loader's model samples and the codec decodes 13 frames per clip, with and without merging; sneakers (the
    class this 55-minute CPU model draws best) are recognised by the image classifier on the garment's crop in most
    frames. Other classes are blobs the classifier often cannot read (see workflows/demo_model/README.md)."""
    frames, gray = generate("wan", "sneaker", merge, batch=3)
    assert frames.shape == (3 * 13, 256, 256, 3) and torch.isfinite(frames).all()
    assert float(frames.min()) >= 0 and float(frames.max()) <= 1
    with torch.no_grad():
        predicted = classifier(garment_crops(gray.flatten(0, 1))).argmax(1)
    accuracy = float((predicted == CLASSES["sneaker"]).float().mean())
    assert accuracy >= 0.6, accuracy


def test_video_codec_layout_and_round_trip(comfy):
    demo = H.pack_module("nodes.demo_model")
    codec = demo.DemoVideoCodec()
    mean, std = codec._stats(torch.device("cpu"))
    coarse = torch.rand(2, 1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gray = torch.nn.functional.interpolate(coarse, size=(3, 32, 32), mode="trilinear")  # smooth frames
    latent = mean + std * gray.expand(-1, 16, -1, -1, -1)
    video = codec.decode(latent)
    assert video.shape == (2, 1 + 4 * 2, 256, 256, 3)  # WAN's layout: the first frame alone, then 4 per latent
    back = codec.encode(video)  # a batch of clips [B, F, H, W, C]
    assert back.shape == latent.shape
    assert float((((back - mean) / std) - gray).abs().mean()) < 0.02
    with pytest.raises(ValueError, match="16, T, H, W"):
        codec.decode(torch.zeros(1, 4, 32, 32))


@pytest.mark.parametrize("family", ["hunyuan", "ltxv"])
def test_other_video_demos_sample_decode_and_merging_follows_the_unmerged_clip(comfy, classifier, family):
    """The LTX-Video and HunyuanVideo demo loaders' models sample 4 latent frames through ComfyUI's own model classes
    and their codecs decode the clip; bags (the class both draw best) are recognised in most frames of the unmerged
    clip; with the node's defaults (half of every frame's tokens merged in self-attention) the clip stays close to the
    unmerged one, and farther than with a tiny ratio."""
    _, _, _, latent_frames, (frame_count, pixels) = VIDEO_DEMOS[family]
    frames, gray = generate(family, "bag")
    assert frames.shape == (2 * frame_count, pixels, pixels, 3) and torch.isfinite(frames).all()
    assert gray.shape == (2, *latent_frames)
    big = torch.nn.functional.interpolate(gray.flatten(0, 1)[:, None], size=(32, 32), mode="bilinear")[:, 0]
    with torch.no_grad():
        predicted = classifier(garment_crops(big)).argmax(1)
    assert float((predicted == CLASSES["bag"]).float().mean()) >= 0.6
    _, merged = generate(family, "bag", WAN_DEFAULT)
    _, slight = generate(family, "bag", dict(WAN_DEFAULT, ratio=0.05))
    error, small_error = float((merged - gray).abs().mean()), float((slight - gray).abs().mean())
    assert 0 < small_error < error < 0.15, (small_error, error)

def test_ltxv_and_hunyuan_codecs_layout_and_round_trip(comfy):
    demo = H.pack_module("nodes.demo_model")
    hunyuan = demo.DemoHunyuanCodec()
    mean, std = hunyuan._stats(torch.device("cpu"))
    import comfy.latent_formats

    gray = torch.rand(1, 1, 2, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latent = mean + std * gray.expand(-1, 16, -1, -1, -1)  # what HunyuanVideo's latent format reads as ``gray``
    assert torch.allclose(comfy.latent_formats.HunyuanVideo().process_in(latent), gray.expand(-1, 16, -1, -1, -1),
                          atol=1e-5)
    assert hunyuan.decode(latent).shape == (1, 5, 256, 256, 3)
    codec = demo.DemoLTXVCodec()
    assert (codec.latent_channels, codec.spacial_compression_decode(), codec.temporal_compression_decode()) == \
        (128, 32, 8)
    coarse = torch.rand(1, 1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gray = torch.nn.functional.interpolate(coarse, size=(3, 16, 16), mode="trilinear")
    latent = gray.expand(-1, 128, -1, -1, -1)
    assert torch.equal(comfy.latent_formats.LTXV().process_in(latent), latent)  # model space is the latent itself
    video = codec.decode(latent)
    assert video.shape == (1, 1 + 8 * 2, 512, 512, 3)  # LTX-Video's layout: the first frame alone, then 8 per latent
    back = codec.encode(video)
    assert back.shape == (1, 128, 3, 16, 16)
    assert float((back - gray).abs().mean()) < 0.02
    with pytest.raises(ValueError, match="128, T, H, W"):
        codec.decode(torch.zeros(1, 16, 3, 16, 16))
