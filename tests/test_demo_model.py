"""The bundled demo model (Fashion-MNIST, trained by the project) loaded by the pack's own node, in a real ComfyUI."""
import pytest
import torch

import comfy_harness as H
from graph import Graph

SIMPLE = dict(ratio=0.5, importance="cfg", start_percent=0.0, end_percent=1.0, levels="auto", scope="attention")
CLASSES = {"trouser": 1, "bag": 8, "sneaker": 7}


def _nodes():
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def generate(prompt_text, merge=None, batch=4, steps=12, seed=5):
    g = Graph()
    loader = g.add("ITM_DemoModelLoader")
    model = loader[0]
    if merge is not None:
        model = g.add("ITM_ImportanceTokenMerging", model=model, **merge)[0]
    pos = g.add("CLIPTextEncode", text=prompt_text, clip=loader[1])
    neg = g.add("CLIPTextEncode", text="", clip=loader[1])
    empty = g.add("EmptyLatentImage", width=256, height=256, batch_size=batch)
    sampled = g.add("KSampler", model=model, positive=pos[0], negative=neg[0], latent_image=empty[0], seed=seed,
                    steps=steps, cfg=4.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    H.run_prompt(g.prompt)
    return _nodes()["HostTestLatentStats"].LAST["out"].clone()


@pytest.fixture(scope="module")
def classifier():
    from quality.classifier import load_classifier

    return load_classifier()


def _accuracy(classifier, latents, label):
    import sys
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows", "demo_model"))
    import comfy.latent_formats
    from fashion_data import to_image

    with torch.no_grad():  # the demo model's latents are in SD1.5's format (model space / its scale factor)
        images = to_image(comfy.latent_formats.SD15().process_in(latents))
        return float((classifier(images).argmax(1) == label).float().mean())


@pytest.mark.parametrize("merge", [None, SIMPLE], ids=["unmerged", "merged"])
def test_demo_model_draws_the_class_it_is_asked_for(comfy, classifier, merge):
    """The project's classifier recognises the demo model's garments, with and without importance merging."""
    scores = {name: _accuracy(classifier, generate(name, merge), label) for name, label in CLASSES.items()}
    assert min(scores.values()) >= 0.75, scores


def test_demo_images_have_gray_levels_and_a_black_background(comfy):
    """What the demo VAE shows: a black background and garments in real gray levels. (Read 5.5x too contrasted, as
    before the SD1.5 latent format was honoured, almost every garment pixel clipped to white.)"""
    demo = H.pack_module("nodes.demo_model")
    image = demo.DemoImageCodec().decode(generate("T-shirt", batch=4, steps=12))[..., 0]  # [4, 256, 256]
    border = torch.cat([image[:, :16].flatten(1), image[:, -16:].flatten(1)], 1)
    assert float(border.mean()) < 0.08, float(border.mean())
    garment = image[image > 0.1]
    assert garment.numel() > 0.15 * image.numel()
    assert float(((garment > 0.2) & (garment < 0.9)).float().mean()) > 0.5  # mostly gray, not clipped to white


def test_prompt_naming_no_class_is_a_clear_error(comfy):
    with pytest.raises(H.PromptError, match="Fashion-MNIST classes"):
        generate("a castle on a hill", steps=1, batch=1)


def test_class_names_in_prompts(comfy):
    demo = H.pack_module("nodes.demo_model")
    assert demo.class_index("A T-shirt, studio photo") == 0
    assert demo.class_index("shirt") == 6
    assert demo.class_index("ankle boots") == 9
    assert demo.class_index("  ") is None


def test_demo_codec_round_trip_and_img2img(comfy):
    demo = H.pack_module("nodes.demo_model")
    codec = demo.DemoImageCodec()
    coarse = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1  # a smooth image
    model_space = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear").expand(-1, 4, -1, -1)
    latent = model_space / 0.18215  # ComfyUI's SD1.5 latent format
    image = codec.decode(latent)
    assert image.shape == (2, 256, 256, 3)
    torch.testing.assert_close(image[:, ::8, ::8, 0].mean(), (model_space[:, 0].mean() + 1) / 2, atol=0.02, rtol=0)
    back = codec.encode(image)
    assert back.shape == (2, 4, 32, 32) and float((back - latent).abs().mean() * 0.18215) < 0.02
    with pytest.raises(ValueError, match="multiples of 8"):
        codec.encode(torch.rand(1, 30, 32, 3))


def test_demo_model_is_v_predicting_as_its_file_says(comfy):
    """The bundled file says how it was trained (metadata "prediction"); the loader builds that model type."""
    import comfy.model_base

    demo = H.pack_module("nodes.demo_model")
    model, _, _, metadata = demo.load_demo_model()
    assert metadata["prediction"] == "v"
    assert model.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    assert demo.build_unet_patcher().model.model_type == comfy.model_base.ModelType.EPS  # the SD1.5 default
    with pytest.raises(ValueError, match="'eps' or 'v'"):
        demo.build_unet_patcher(prediction="x0")
