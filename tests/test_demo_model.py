"""The embedded demo model: its data generator, its adherence checker (which must be able to fail), its weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tools.demo import adherence, shapes, split, text_encoder

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "assets" / "demo-model"
REFERENCES = ROOT / "assets" / "demo-references"
# The targets, which the shipped weights must keep reaching (docs/DEMO_MODEL.md records the scores:
# 97.9 / 100 / 95.8 / 97.9).
TARGETS = {"shape_color": 90.0, "background": 90.0, "shape": 75.0, "position": 80.0}


def test_generator_is_deterministic():
    a_img, a_cap, a_attrs = shapes.sample(123)
    b_img, b_cap, b_attrs = shapes.sample(123)
    assert np.array_equal(np.asarray(a_img), np.asarray(b_img)) and a_cap == b_cap and a_attrs == b_attrs
    assert a_img.size == (128, 128) and a_img.mode == "RGB"
    others = [shapes.sample(s) for s in range(124, 130)]
    assert any(not np.array_equal(np.asarray(a_img), np.asarray(o[0])) for o in others)
    assert len({o[1] for o in others}) > 1


def test_parse_reads_every_phrasing():
    for t in range(len(shapes.TEMPLATES)):
        attrs = {"shape_color": "purple", "background": "orange", "shape": "triangle", "position": "right"}
        got = adherence.parse(shapes.caption(attrs, t))
        want = dict(attrs, position=None if t in shapes.POSITIONLESS else "right")
        assert got == want, shapes.caption(attrs, t)


def test_checker_scores_ground_truth_fully():
    items = [(cap, img) for img, cap, _ in (shapes.sample(s, positionless=False) for s in range(60))]
    result = adherence.score(items)
    for k in adherence.ATTRIBUTES:
        assert result[k] == 100.0, (k, result[k])


def test_checker_ignores_a_line_along_the_image_edge():
    """A 1-px line along the top and left edges (what a VAE decoder can draw there) is not part of the shape."""
    attrs = {"shape_color": "green", "background": "white", "shape": "square", "position": "center"}
    a = np.asarray(shapes.draw(attrs)).copy()
    a[0, :], a[:, 0] = (200, 160, 200), (210, 240, 200)
    assert adherence.analyse(a) == attrs


def test_checker_fails_wrong_images():
    base = {"shape_color": "red", "background": "blue", "shape": "circle", "position": "left"}
    prompt = shapes.caption(base, 0)
    wrong = [
        ("shape_color", dict(base, shape_color="green")),
        ("background", dict(base, background="yellow")),
        ("shape", dict(base, shape="square")),
        ("position", dict(base, position="right")),
    ]
    for key, attrs in wrong:
        result = adherence.score([(prompt, shapes.draw(attrs))])
        assert result[key] == 0.0, key
        assert all(result[k] == 100.0 for k in adherence.ATTRIBUTES if k != key)
    blank = adherence.score([(prompt, np.full((128, 128, 3), 30, np.uint8))])  # nothing drawn at all
    assert blank["shape_color"] == blank["shape"] == blank["position"] == 0.0


def test_held_out_prompts_are_disjoint_from_training():
    held = split.held_out()
    assert len(held) >= 40
    combos = split.held_out_combos()
    pool = split.caption_pool(200)
    train_caps = {c for _, c, _ in pool}
    assert not train_caps & {p for p, _ in held}
    for _, _, a in pool:  # captions that name no position are drawn in the center: checked the same way
        assert (a["shape_color"], a["background"], a["shape"], a["position"]) not in combos
    unplaced = [a for _, _, a in pool if not a["positioned"]]
    assert unplaced and all(a["position"] == "center" for a in unplaced)


def test_shipped_model_draws_a_red_circle_on_blue():
    torch = pytest.importorskip("torch")
    from diffusers import Flux2KleinPipeline

    defaults = json.loads((MODEL / "edgegen_defaults.json").read_text())
    assert defaults["width"] == defaults["height"] == 128
    weights = sum(p.stat().st_size for p in MODEL.rglob("*.safetensors"))
    assert weights <= 25 * 1024 * 1024 and not list(MODEL.rglob("*.bin"))
    pipe = Flux2KleinPipeline.from_pretrained(MODEL, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and never stalls on a busy machine
    try:
        # The issue's own prompt names no position: such captions are drawn in the center.
        image = pipe(prompt="a red circle on a blue background", num_inference_steps=defaults["steps"],
                     guidance_scale=defaults["guidance"], width=128, height=128,
                     max_sequence_length=defaults["max_sequence_length"],
                     generator=torch.Generator("cpu").manual_seed(0)).images[0]
    finally:
        torch.set_num_threads(threads)
    assert image.size == (128, 128)
    got = adherence.analyse(image)
    assert got == {"shape_color": "red", "background": "blue", "shape": "circle", "position": "center"}, got


def test_text_encoder_parses_every_caption():
    """The constructed Qwen3 writes each caption's attributes into every later token, padding included."""
    import torch

    from export.synthetic import build_klein
    from tools.demo.train import SIZE, tokenizer_corpus

    pipe = build_klein(SIZE, corpus=tokenizer_corpus(), seed=0)
    text_encoder.set_weights(pipe.text_encoder, pipe.tokenizer)
    captions = [c for c, _ in split.held_out(12)] + [shapes.caption(
        {"shape_color": "black", "background": "white", "shape": "square", "position": "left"}, t)
        for t in range(len(shapes.TEMPLATES))]
    with torch.no_grad():
        emb = pipe._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, captions)
    assert emb.shape[-1] == 3 * text_encoder.HIDDEN
    assert torch.equal(emb[..., :64], emb[..., 64:128]) and torch.equal(emb[..., :64], emb[..., 128:])
    for i, caption in enumerate(captions):
        for pos in (60, 511):  # inside the padding
            assert text_encoder.describe(emb[i, pos, :64]) == adherence.parse(caption), caption
    swapped = [shapes.caption({"shape_color": "white", "background": "black", "shape": "square",
                               "position": "left"}, 0)]
    with torch.no_grad():
        other = pipe._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, swapped)
    assert text_encoder.describe(other[0, 100, :64])["shape_color"] == "white"  # binding, not a bag of words


@pytest.fixture(scope="module")
def reference_scores():
    from tools.demo.evaluate import generate

    return adherence.score(generate(MODEL, split.held_out()))


def test_reference_meets_the_adherence_targets(reference_scores):
    got = {k: reference_scores[k] for k in adherence.ATTRIBUTES}
    assert reference_scores["n"] >= 40
    assert all(got[k] >= TARGETS[k] for k in TARGETS), got


def test_onnx_bundle_scores_within_two_points_of_reference(demo_bundle, reference_scores):
    from tools.demo.evaluate import generate_bundle

    bundle = adherence.score(generate_bundle(demo_bundle, split.held_out()))
    diffs = {k: bundle[k] - reference_scores[k] for k in adherence.ATTRIBUTES}
    assert all(abs(d) <= 2.0 for d in diffs.values()), (diffs, bundle)


def test_selftest_passes_on_shipped_references(demo_bundle, capsys):
    """What a site runs: the shipped references, reproduced by every backend available here."""
    from app.cli import main

    index = json.loads((REFERENCES / "index.json").read_text())
    assert len(index) >= 3 and all((REFERENCES / r["file"]).is_file() for r in index)
    assert main(["selftest", "--bundle", str(demo_bundle)]) == 0
    out = capsys.readouterr().out
    passed = re.search(r"PASS: (\d+) backend\(s\) reproduced the references", out)
    assert passed and int(passed.group(1)) >= 2, out  # at least the PyTorch reference and ONNX Runtime CPU
