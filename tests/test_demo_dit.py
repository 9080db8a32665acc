"""The bundled image DiT demo model (Fashion-MNIST on ComfyUI's Qwen-Image class, trained by the project), loaded by
the pack's own node in a real ComfyUI 0.14.1; skipped on the 2024 host (no Qwen-Image there)."""
import pytest
import torch

import comfy_harness as H
from graph import Graph

SIMPLE = dict(ratio=0.5, importance="cfg", start_percent=0.0, end_percent=1.0, levels="auto", scope="attention")
CLASSES = {"trouser": 1, "sneaker": 7, "bag": 8, "ankle boot": 9}


@pytest.fixture(autouse=True)
def _modern(comfy):
    if H.host_kind() != "modern":
        pytest.skip("the DiT demo model is a Qwen-Image model: it exists only in current ComfyUI (not on the 2024 "
                    "host)")


def _nodes():
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def generate(prompt_text, merge=None, batch=4, steps=16, seed=5):
    """(decoded images [B, 256, 256, 3], model-space gray [B, 32, 32] in [0, 1])."""
    g = Graph()
    loader = g.add("ITM_DemoDiTModelLoader")
    model = loader[0]
    if merge is not None:
        model = g.add("ITM_ImportanceTokenMerging", model=model, **merge)[0]
    pos = g.add("CLIPTextEncode", text=prompt_text, clip=loader[1])
    neg = g.add("CLIPTextEncode", text="", clip=loader[1])
    empty = g.add("EmptySD3LatentImage", width=256, height=256, batch_size=batch)
    sampled = g.add("KSampler", model=model, positive=pos[0], negative=neg[0], latent_image=empty[0], seed=seed,
                    steps=steps, cfg=4.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    decoded = g.add("VAEDecode", samples=sampled[0], vae=loader[2])
    g.add("HostTestImageStats", "images", images=decoded[0])
    H.run_prompt(g.prompt)
    latent = _nodes()["HostTestLatentStats"].LAST["out"].clone()
    mean, std = H.pack_module("nodes.demo_model").DemoVideoCodec._stats(torch.device("cpu"))
    gray = (((latent - mean) / std).mean(dim=1)[:, 0] + 1) / 2
    return _nodes()["HostTestImageStats"].LAST["images"].clone(), gray.clamp(0, 1)


@pytest.fixture(scope="module")
def classifier():
    from quality.classifier import load_classifier

    return load_classifier()


@pytest.mark.parametrize("merge", [None, SIMPLE, dict(SIMPLE, scope="transformer")],
                         ids=["unmerged", "attention", "transformer"])
def test_dit_demo_samples_decodes_and_draws_the_class_asked_for(comfy, classifier, merge):
    """The loader's model samples and the codec decodes 256x256 images, with and without merging. Unmerged, the image
    classifier recognises the class asked for in most of them; merged at ratio 0.5 this small DiT loses much of
    that (see README "Image DiTs"), but stays well above chance (0.1)."""
    correct = []
    for text, index in CLASSES.items():
        images, gray = generate(text, merge)
        assert images.shape == (4, 256, 256, 3) and torch.isfinite(images).all()
        assert float(images.min()) >= 0 and float(images.max()) <= 1
        with torch.no_grad():
            correct.append(classifier(gray).argmax(1) == index)
    accuracy = float(torch.cat(correct).float().mean())
    assert accuracy >= (0.6 if merge is None else 0.25), accuracy


def test_dit_demo_is_the_qwen_image_class_and_its_codec_round_trips(comfy):
    """The loader builds ComfyUI's Qwen-Image model (so the Qwen-Image adapter merges it) and its codec stores the
    image in every channel of one latent frame in WAN's layout."""
    demo = H.pack_module("nodes.demo_model")
    model, clip, vae, metadata = demo.load_demo_dit_model()
    assert type(model.model.diffusion_model).__name__ == "QwenImageTransformer2DModel"
    assert H.pack_module("nodes.qwen").supports(model)
    assert metadata["format"] == "importance-token-merging DiT demo model v1"
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    latent = vae.encode(pixels)
    assert latent.shape == (1, 16, 1, 8, 8)
    mean, std = demo.DemoVideoCodec._stats(torch.device("cpu"))
    model_space = (latent - mean) / std  # what the model sees (ComfyUI's Wan21 latent format)
    coarse = torch.nn.functional.avg_pool2d(pixels.mean(-1)[:, None], 8) * 2 - 1  # [1, 1, 8, 8]
    torch.testing.assert_close(model_space, coarse[:, :, None].expand(-1, 16, -1, -1, -1), atol=1e-5, rtol=1e-5)
    decoded = vae.decode(latent)
    assert decoded.shape[-3:] == (64, 64, 3) and decoded.numel() == 64 * 64 * 3
