"""The Token Merging Preview node and the live preview sender, through a real ComfyUI (both hosts).

Pictures are checked for what they must show: merged tokens (blue) are the share of the ratio, they sit where the
importance map is low, the warm-up step has no map (grey), every video frame and every tiled view gets its own
picture, and the live sender hands the merging node's id and a PNG of the latest step to ComfyUI's server.
"""
import base64
import io
import time

import pytest
import torch

import comfy_harness as H
from graph import Graph, Out, last_run, node_classes

SIMPLE = dict(ratio=0.5, importance="cfg", start_percent=0.0, end_percent=1.0, levels="auto", scope="attention")
ADVANCED = dict(SIMPLE, dst_fraction=0.25, pool_scale=1.2, dst_mode="grid", warmup_mode="merge",
                cfg1_mode="random", merge_cross_attn=False, merge_seed=0)
BLUE, GREEN, YELLOW = (0.20, 0.30, 0.85), (0.18, 0.74, 0.38), (1.00, 0.80, 0.10)


def pictures(node_id):
    return node_classes()["HostTestImageStats"].LAST[node_id]


def is_colour(picture, colour):
    return (picture - torch.tensor(colour)).abs().amax(-1) < 1e-4


def colour_share(picture, colour):
    """Share of the pixels of [H, W, 3] pictures that have exactly ``colour``."""
    return float(is_colour(picture, colour).float().mean())


def preview_graph(g, model, images, step=-1, level="first", opacity=1.0):
    out = g.add("ITM_MergePreview", "preview", model=model, images=images, step=step, level=level, opacity=opacity)
    g.add("HostTestImageStats", "importance", images=out[0])
    g.add("HostTestImageStats", "merge_map", images=out[1])


def image_graph(merge=SIMPLE, batch=2, size=128, steps=4, step=-1, opacity=1.0, advanced=False, cfg=5.0, seed=7,
                sampler="euler"):
    g = Graph()
    tiny = g.add("HostTestTinyModel", arch="sd15", seed=0)
    node = "ITM_ImportanceTokenMergingAdvanced" if advanced else "ITM_ImportanceTokenMerging"
    model = g.add(node, "merge", model=tiny[0], **merge)[0]
    probe = g.add("HostTestAttnProbe", "probe", model=model)
    empty = g.add("EmptyLatentImage", width=size, height=size, batch_size=batch)
    sampled = g.add("KSampler", "sampler", model=probe[0], positive=tiny[1], negative=tiny[2], latent_image=empty[0],
                    seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="normal", denoise=1.0)
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    preview_graph(g, model, decoded(g, sampled), step=step, opacity=opacity)
    return g


def decoded(g, sampled):
    """The sampled latents decoded (grey images, 8x the latent size): the preview runs after sampling."""
    return g.add("VAEDecode", "decode", samples=sampled[0], vae=g.add("HostTestImageCodec")[0])[0]


def luminance(picture):
    return picture @ torch.tensor([0.299, 0.587, 0.114])


def test_merge_map_shows_the_ratio_and_importance_decides_what_merges(comfy):
    H.run_prompt(image_graph().prompt)
    merge, importance = pictures("merge_map"), pictures("importance")
    assert merge.shape == importance.shape == (2, 128, 128, 3)
    run = last_run()
    assert sorted(run.previews) == [0, 1, 2, 3] and run.tokens == {0: (256, 128)}
    for index in range(2):
        assert colour_share(merge[index], BLUE) == pytest.approx(0.5)  # ratio 0.5: half of the tokens merged away
        kept = colour_share(merge[index], GREEN) + colour_share(merge[index], YELLOW)
        assert kept == pytest.approx(0.5)
        # the last step merged with an importance map: the tokens kept as themselves (green) are brighter on average
        light = luminance(importance[index])
        blue, green = (float(light[is_colour(merge[index], c)].mean()) for c in (BLUE, GREEN))
        assert blue < green
        # and exactly: only the pool of the (N - r) * pool_scale = 153 most important tokens can stay independent
        last = run.previews[3]
        values, roles = last.importance[index].flatten().int(), last.roles[0][index]
        independent = roles == H.pack_module("merging").TokenRole.INDEPENDENT
        assert int(independent.sum()) > 20
        assert int(values[independent].min()) >= int(values.sort().values[256 - 153]) - 1
    # the pictures of the two samples differ: each sample has its own map and partition
    assert not torch.equal(merge[0], merge[1]) and not torch.equal(importance[0], importance[1])


def test_first_step_has_no_map_and_opacity_blends_over_the_images(comfy):
    g = image_graph(step=0, opacity=0.5)
    g.add("HostTestImageStats", "decoded", images=["decode", 0])
    H.run_prompt(g.prompt)
    base = pictures("decoded")
    importance, merge = pictures("importance"), pictures("merge_map")
    # warm-up: no importance map yet (grey), drawn at half opacity over the decoded images
    assert torch.allclose(importance, 0.5 * torch.full_like(importance, 0.5) + 0.5 * base, atol=1e-5)
    # random 2x2 cells: still half of the tokens merged away
    g.prompt["preview"]["inputs"]["opacity"] = 1.0
    H.run_prompt(g.prompt)
    assert colour_share(pictures("merge_map")[0], BLUE) == pytest.approx(0.5)
    blend = 0.5 * pictures("merge_map") + 0.5 * base
    assert torch.allclose(merge, blend, atol=1e-5)


def test_steps_outside_the_active_range_show_the_nearest_merged_step(comfy):
    H.run_prompt(image_graph(merge=dict(SIMPLE, start_percent=0.5), step=0).prompt)
    run = last_run()
    merged_steps = sorted(run.previews)
    assert merged_steps and merged_steps[0] > 0 and run.evaluations_inactive >= 1
    # step 0 was not merged: the picture is the first merged step's, which had a map (not grey)
    assert not torch.allclose(pictures("importance"), torch.full_like(pictures("importance"), 0.5))


def test_clear_errors_for_an_unmerged_model_and_mismatched_images(comfy):
    g = Graph()
    tiny = g.add("HostTestTinyModel", arch="sd15", seed=0)
    images = g.add("EmptyImage", width=64, height=64, batch_size=1, color=0)
    preview_graph(g, tiny[0], images[0])
    with pytest.raises(H.PromptError, match="no Importance Token Merging on it"):
        H.run_prompt(g.prompt)
    g = image_graph(batch=2)
    three = g.add("RepeatImageBatch", image=["decode", 0], amount=3)  # 6 pictures for 2 sampled latents
    g.prompt["preview"]["inputs"]["images"] = three[0]
    with pytest.raises(H.PromptError, match="holds 6 pictures but the run sampled 2"):
        H.run_prompt(g.prompt)


def test_tiled_views_are_merged_view_by_view(comfy):
    """3x2 views in one latent (Zero123++ style): every view loses half of its tokens."""
    from test_video_nodes import tiled_views_graph

    g, model, sampled = tiled_views_graph(ADVANCED)
    preview_graph(g, model, decoded(g, sampled))
    H.run_prompt(g.prompt)
    merge = pictures("merge_map")[0]
    assert merge.shape == (144, 96, 3)
    for row in range(3):
        for col in range(2):
            view = merge[row * 48:(row + 1) * 48, col * 48:(col + 1) * 48]
            assert colour_share(view, BLUE) == pytest.approx(0.5)


@pytest.mark.parametrize("windows", [None, (4, 2)])
def test_every_video_frame_gets_its_picture(comfy, windows):
    from test_video_nodes import _context_windows, video_graph

    if windows is not None and "ContextWindowsManual" not in node_classes():
        pytest.skip("context windows exist only in current ComfyUI (not on the 2024 host)")
    frames = 6
    g = video_graph("svd", frames=frames, windows=None if windows is None else _context_windows(*windows))
    preview_graph(g, ["merge", 0], decoded(g, Out("sampler")))
    H.run_prompt(g.prompt)
    merge, importance = pictures("merge_map"), pictures("importance")
    assert merge.shape == importance.shape == (frames, 64, 64, 3)
    for frame in range(frames):
        assert colour_share(merge[frame], BLUE) == pytest.approx(0.5)
    last = max(last_run().previews.values(), key=lambda p: p.step)
    assert sorted(last.roles[0]) == list(range(frames))  # every frame recorded, windows included
    assert not torch.equal(importance[0], importance[1])


def test_only_the_latest_runs_keep_their_previews(comfy):
    """The graph re-queued with a new seed (the merging node is served from ComfyUI's cache): the preview shows the
    latest run, and only the two latest runs keep their pictures."""
    executor = None
    shown = []
    for seed in (1, 2, 3):
        _, executor = H.run_prompt(image_graph(seed=seed).prompt, return_executor=True, executor=executor)
        shown.append(pictures("merge_map").clone())
    assert not torch.equal(shown[1], shown[2])  # a new run, new pictures
    runtime = node_classes()["HostTestAttnProbe"].RUNTIMES["probe"]
    runs = runtime.summaries()
    assert len(runs) >= 3 and runs[-1].previews and runs[-2].previews
    assert not any(r.previews for r in runs[:-2])  # older runs drop their pictures


class RecordingServer:
    """Receives what the live preview sends (the real server is exercised by tests/test_web_preview.py)."""

    client_id = "client-1"

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data, sid))


def test_live_preview_sends_the_latest_step_to_the_merging_node(comfy, monkeypatch):
    preview = H.pack_module("nodes.preview")
    server = RecordingServer()
    monkeypatch.setattr(preview, "prompt_server", lambda: server)
    H.run_prompt(image_graph(steps=6).prompt)
    time.sleep(1.0)  # the trailing message is sent by a timer thread
    assert server.messages, "nothing was sent"
    events = {event for event, _, _ in server.messages}
    assert events == {preview.EVENT}
    steps = [data["step"] for _, data, _ in server.messages]
    assert steps == sorted(steps) and steps[-1] == 5  # the last step always arrives (trailing message)
    _, data, sid = server.messages[-1]
    assert data["node"] == "merge" and sid == "client-1" and (data["tokens"], data["kept"]) == (256, 128)
    from PIL import Image

    png = Image.open(io.BytesIO(base64.b64decode(data["image"].split(",", 1)[1])))
    assert png.format == "PNG" and png.size[0] > png.size[1] > 100  # importance | merge map side by side
    run = last_run()
    assert run.preview_seconds > 0


def test_area_conditioning_shows_the_whole_latent(comfy, monkeypatch):
    """An area cond runs on a crop of the latent, often before the full-size uncond: the pictures (and the live
    preview's token count) are the whole latent's, not the crop's."""
    preview = H.pack_module("nodes.preview")
    server = RecordingServer()
    monkeypatch.setattr(preview, "prompt_server", lambda: server)
    g = image_graph(batch=1)
    area = g.add("ConditioningSetArea", conditioning=["1", 1], width=64, height=64, x=64, y=64, strength=1.0)
    g.prompt["sampler"]["inputs"]["positive"] = area[0]
    H.run_prompt(g.prompt)
    time.sleep(1.0)
    run = last_run()
    grid = H.pack_module("merging").TokenGrid
    assert all(p.grids == {0: grid(16, 16)} for p in run.previews.values())
    assert run.tokens == {0: (256, 128)}
    assert {(d["tokens"], d["kept"]) for _, d, _ in server.messages} == {(256, 128)}
    assert colour_share(pictures("merge_map")[0], BLUE) == pytest.approx(0.5)


def test_every_model_evaluation_of_a_second_order_sampler_gets_its_step(comfy):
    """heun evaluates the model twice per step, the second time at the next step's sigma: 4 steps = 7 evaluations,
    each its own preview step on current ComfyUI (its predict_noise wrapper marks them). The 2024 host has no such
    hook and counts sigmas: 4 (documented)."""
    H.run_prompt(image_graph(steps=4, sampler="heun").prompt)
    run = last_run()
    assert run.maps_captured == 7
    evaluations = 7 if H.host_kind() == "modern" else 4
    assert sorted(run.previews) == list(range(evaluations))
    assert run.evaluations_with_map == evaluations - 1 and run.evaluations_without_map == 1
