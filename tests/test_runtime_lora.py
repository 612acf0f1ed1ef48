"""Run-time LoRA (issue 25): one bundle, any library LoRA per request, against diffusers' own run-time LoRA.

The bundles are the held-out variants (tests/conftest.py: variant_bundle), exported with --runtime-lora 16. The
LoRAs here have ranks, alphas and target sets the runtime was not written against, and the reference is
diffusers' pipeline with the same file loaded (load_lora_weights + set_adapters), same folder, same seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.cli import main
from app.runtime.images import psnr
from export import synthetic
from tests.conftest import VARIANT_LORA_RANK, variant_bundle

PIPES = {"flux2-klein": "Flux2KleinPipeline", "sd3.5": "StableDiffusion3Pipeline"}
make_lora = synthetic.save_lora


class Reference:
    """diffusers' pipeline for one model folder with LoRAs loaded as adapters, switched per image."""

    def __init__(self, model: Path, family: str, loras: dict[str, Path]):
        import diffusers

        self.pipe = getattr(diffusers, PIPES[family]).from_pretrained(model, local_files_only=True)
        for name, path in loras.items():
            self.pipe.load_lora_weights(path, adapter_name=name)

    def image(self, choice: list[tuple[str, float]], prompt, seed, steps, guidance, w, h, **kw) -> np.ndarray:
        if choice:
            self.pipe.enable_lora()
            self.pipe.set_adapters([n for n, _ in choice], [s for _, s in choice])
        else:
            self.pipe.disable_lora()
        out = self.pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, width=w, height=h,
                        generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).images[0]
        return (out * 255).round().astype(np.uint8)


def add(path: Path, name: str, *extra: str) -> None:
    assert main(["lora", "add", str(path), "--name", name, *extra]) == 0


# Target sets unlike the development LoRA's (to_q, to_k, to_qkv_mlp_proj): value/output projections, the text
# stream, the feed-forwards, the single block's output, embedders and the final projection.
KLEIN_A = dict(r=5, alpha=10.0, gain=16.0, targets=["to_v", "add_v_proj", "to_out.0", "ff.linear_out",
                                                     "single_transformer_blocks.0.attn.to_out"])
KLEIN_B = dict(r=2, alpha=1.0, gain=16.0, targets=["to_q", "ff_context.linear_in", "x_embedder", "proj_out", "to_qkv_mlp_proj"])
SD3_A = dict(r=6, alpha=3.0, gain=9.0, targets=["to_k", "add_q_proj", "ff.net.0.proj", "to_add_out", "proj_out"])


@pytest.fixture(scope="module")
def klein_cfg(tmp_path_factory):
    """The Klein base variant (CFG on) with two LoRAs of its own shapes."""
    model, bundle = variant_bundle(tmp_path_factory, "lat16-base-cfg")
    d = tmp_path_factory.mktemp("klein-loras")
    return model, bundle, {"brand-a": make_lora(model, "flux2-klein", d / "a", seed=1, **KLEIN_A),
                           "brand-b": make_lora(model, "flux2-klein", d / "b", seed=2, **KLEIN_B)}


def test_switching_loras_between_requests_gives_diffusers_image_for_each(klein_cfg):
    """One loaded pipeline, four requests: A, B, A + B at two strengths, none; each equals diffusers' run-time
    LoRA image for its own choice, and each LoRA visibly changes the image."""
    from app.bundle.manifest import load_bundle
    from app.runtime.backend import make_backend
    from app.runtime.pipelines import GenerationRequest, make_pipeline

    model, bundle_dir, files = klein_cfg
    for name, path in files.items():
        add(path, name)
    bundle = load_bundle(bundle_dir)
    backend, _ = make_backend(bundle, "onnxruntime")
    pipe = make_pipeline(bundle, backend)
    ref = Reference(model, "flux2-klein", files)
    images = {}
    for choice in ([("brand-a", 0.8)], [("brand-b", 1.0)], [("brand-a", 0.6), ("brand-b", -0.5)], []):
        result = pipe.generate(GenerationRequest(prompt="a red circle", seed=4, steps=3, guidance=3.0, width=64,
                                                 height=48, loras=tuple(choice)))
        expect = ref.image(choice, "a red circle", 4, 3, 3.0, 64, 48)
        assert psnr(result.image, expect) >= 60, choice
        assert [(r["name"], r["strength"]) for r in result.loras] == choice
        images[tuple(choice)] = result.image
    plain = images[()]
    for choice, img in images.items():
        if choice:
            assert psnr(img, plain) < 40, choice  # the LoRA took effect (not a zero branch)


def test_a_kohya_layout_lora_matches_diffusers_reading_the_same_file(klein_cfg, tmp_path):
    """A kohya-trained FLUX.2 LoRA (lora_unet_* keys, lora_down/lora_up, alphas, a fused qkv) in the library;
    the reference is diffusers loading that same file (its own kohya converter)."""
    from safetensors.torch import save_file

    from app.bundle.loras import find_record

    model, bundle, _ = klein_cfg
    slots = {s["module"]: (s["in"], s["out"])
             for s in json.loads((bundle / "manifest.json").read_text())["components"]["transformer"]["lora"]["slots"]}
    g = torch.Generator().manual_seed(7)
    state = {}

    def pair(key: str, i: int, o: int, r: int, alpha: float) -> None:
        state[f"{key}.lora_down.weight"] = torch.randn(r, i, generator=g) * 0.5
        state[f"{key}.lora_up.weight"] = torch.randn(o, r, generator=g) * 0.5
        state[f"{key}.alpha"] = torch.tensor(alpha)

    q_in, q_out = slots["transformer_blocks.0.attn.to_q"]
    pair("lora_unet_double_blocks_0_img_attn_qkv", q_in, 3 * q_out, 4, 2.0)  # split into to_q/to_k/to_v
    pair("lora_unet_single_blocks_0_linear2", *slots["single_transformer_blocks.0.attn.to_out"], 3, 6.0)
    pair("lora_unet_double_blocks_0_txt_mlp_0", *slots["transformer_blocks.0.ff_context.linear_in"], 2, 1.0)
    f = tmp_path / "kohya-brand.safetensors"
    save_file(state, f)
    add(f, "kohya-brand")  # the family from the layer names
    assert find_record("kohya-brand").layout == "kohya"
    out = tmp_path / "k.png"
    assert main(["generate", "--bundle", str(bundle), "--prompt", "a red circle", "--seed", "2", "--steps", "3",
                 "--guidance", "3", "--width", "48", "--height", "48", "--lora", "kohya-brand:0.9", "--out",
                 str(out)]) == 0
    ours = np.asarray(Image.open(out).convert("RGB"))
    ref = Reference(model, "flux2-klein", {"k": f})
    assert psnr(ours, ref.image([("k", 0.9)], "a red circle", 2, 3, 3.0, 48, 48)) >= 60
    assert psnr(ours, ref.image([], "a red circle", 2, 3, 3.0, 48, 48)) < 40


def test_cli_lora_on_a_model_without_cfg_and_its_records(tmp_path_factory, tmp_path):
    """generate --lora on the grouped-query Klein variant (distilled, CFG off), with PNG metadata and audit."""
    model, bundle = variant_bundle(tmp_path_factory, "lat8-heads3-gqa")
    path = make_lora(model, "flux2-klein", tmp_path / "l", seed=3, **KLEIN_B)
    add(path, "brand-c", "--bundle", str(bundle))
    out = tmp_path / "c.png"
    assert main(["generate", "--bundle", str(bundle), "--prompt", "a blue square", "--seed", "2", "--steps", "3",
                 "--guidance", "1", "--width", "48", "--height", "64", "--lora", "brand-c:1.3", "--out",
                 str(out)]) == 0
    ours = np.asarray(Image.open(out).convert("RGB"))
    ref = Reference(model, "flux2-klein", {"c": path})
    assert psnr(ours, ref.image([("c", 1.3)], "a blue square", 2, 3, 1.0, 48, 64)) >= 60
    assert psnr(ours, ref.image([], "a blue square", 2, 3, 1.0, 48, 64)) < 40
    from app.bundle.files import sha256_file

    sha = sha256_file(path)
    meta = json.loads(Image.open(out).info["edgegen"])
    assert meta["loras"] == [{"name": "brand-c", "strength": 1.3, "sha256": sha}]
    audit = [json.loads(line) for line in (tmp_path / "audit" / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["loras"] == meta["loras"]


def test_sd3_runtime_lora_with_cfg_matches_diffusers(tmp_path_factory, tmp_path):
    model, bundle = variant_bundle(tmp_path_factory, "sd3-odd")
    path = make_lora(model, "sd3.5", tmp_path / "s", seed=4, **SD3_A)
    add(path, "sd-brand")
    out = tmp_path / "s.png"
    args = ["--prompt", "a red circle", "--negative-prompt", "blurry", "--seed", "5", "--steps", "3",
            "--guidance", "4.5", "--width", "48", "--height", "36"]
    assert main(["generate", "--bundle", str(bundle), *args, "--lora", "sd-brand:0.7", "--out", str(out)]) == 0
    ours = np.asarray(Image.open(out).convert("RGB"))
    ref = Reference(model, "sd3.5", {"s": path})
    kw = dict(negative_prompt="blurry")
    assert psnr(ours, ref.image([("s", 0.7)], "a red circle", 5, 3, 4.5, 48, 36, **kw)) >= 60
    assert psnr(ours, ref.image([], "a red circle", 5, 3, 4.5, 48, 36, **kw)) < 40


def test_the_manifest_records_the_slots_and_engines_profile_the_rank(tmp_path_factory):
    from app.bundle.families import lora_input_names

    _, bundle = variant_bundle(tmp_path_factory, "sd3-odd")
    m = json.loads((bundle / "manifest.json").read_text())
    lora = m["components"]["transformer"]["lora"]
    assert lora["max_rank"] == VARIANT_LORA_RANK and len(lora["slots"]) > 20
    names = {i["name"]: i["shape"] for i in m["components"]["transformer"]["inputs"]}
    for i, slot in enumerate(lora["slots"]):
        a, b = lora_input_names(i)
        assert names[a] == ["lora_rank", slot["in"]] and names[b] == [slot["out"], "lora_rank"]


# ---------------------------------------------------------------- bad input: one line, exit 2, before any work


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if not ln.startswith(("[", "signature:", "backend:"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def library_loras(tmp_path_factory):
    """LoRA files for the refusals: an SD3 one, one of other Klein shapes, one above the bundle's rank."""
    klein_model, _ = variant_bundle(tmp_path_factory, "lat16-base-cfg")
    gqa_model, _ = variant_bundle(tmp_path_factory, "lat8-heads3-gqa")
    sd3_model, _ = variant_bundle(tmp_path_factory, "sd3-odd")
    d = tmp_path_factory.mktemp("bad-loras")
    return {
        "sd3": make_lora(sd3_model, "sd3.5", d / "sd3", 2, 2.0, ["to_q"], 0),
        "other-shapes": make_lora(gqa_model, "flux2-klein", d / "gqa", 2, 2.0, ["to_q"], 0),
        "too-big": make_lora(klein_model, "flux2-klein", d / "big", VARIANT_LORA_RANK + 4, 1.0, ["to_q"], 0),
        "fine": make_lora(klein_model, "flux2-klein", d / "fine", 4, 4.0, ["to_k"], 0),
    }


def test_bad_lora_requests_are_refused_in_one_line(library_loras, tmp_path_factory, tmp_path, capsys,
                                                   monkeypatch):
    _, bundle = variant_bundle(tmp_path_factory, "lat16-base-cfg")
    for name in ("sd3", "other-shapes", "too-big", "fine"):
        add(library_loras[name], name, "--family", "sd3.5" if name == "sd3" else "flux2-klein")
    capsys.readouterr()
    out = tmp_path / "x.png"

    def refused(*lora: str, needle: str):
        rc = main(["generate", "--bundle", str(bundle), "--prompt", "x", "--steps", "1", "--out", str(out),
                   *[a for item in lora for a in ("--lora", item)]])
        line = _one_line(capsys)
        assert rc == 2 and needle in line, line
        assert "signature:" not in capsys.readouterr().err  # refused before the bundle was hashed or loaded
        assert not out.exists()

    refused("sd3", needle="is for Stable Diffusion 3.5")
    refused("other-shapes", needle="made for another")
    refused("too-big", needle=f"re-export with --runtime-lora {VARIANT_LORA_RANK + 4}")
    refused("fine", "fine:2", needle="chosen twice")
    refused("no-such", needle="no LoRA named 'no-such'")
    for strength in ("nan", "11", "abc"):
        rc = main(["generate", "--bundle", str(bundle), "--prompt", "x", "--out", str(out), "--lora",
                   f"fine:{strength}"])
        assert rc == 2 and "strength" in capsys.readouterr().err
    # a file that changed after it was added, and one that is gone
    lib = tmp_path / "loras"
    (lib / "fine.safetensors").write_bytes((lib / "fine.safetensors").read_bytes()[:-8] + b"\0" * 8)
    rc = main(["generate", "--bundle", str(bundle), "--prompt", "x", "--steps", "1", "--out", str(out),
               "--lora", "fine"])
    assert rc == 2 and "does not match its record's sha256" in capsys.readouterr().err and not out.exists()
    (lib / "fine.safetensors").unlink()
    rc = main(["generate", "--bundle", str(bundle), "--prompt", "x", "--steps", "1", "--out", str(out),
               "--lora", "fine"])
    assert rc == 2 and "is missing" in capsys.readouterr().err and not out.exists()


def test_a_bundle_without_lora_inputs_says_how_to_get_them(klein_bundle, library_loras, tmp_path, capsys):
    add(library_loras["fine"], "fine", "--family", "flux2-klein")
    capsys.readouterr()
    rc = main(["generate", "--bundle", str(klein_bundle), "--prompt", "x", "--out", str(tmp_path / "x.png"),
               "--lora", "fine"])
    line = _one_line(capsys)
    assert rc == 2 and "--runtime-lora" in line


def test_library_add_refuses_pickle_and_unknown_layouts(tmp_path, capsys):
    pickle = tmp_path / "brand.safetensors"
    torch.save({"x": torch.zeros(2)}, pickle)
    assert main(["lora", "add", str(pickle), "--family", "flux2-klein"]) == 2
    assert "not a safetensors file" in _one_line(capsys)
    from safetensors.torch import save_file

    dora = tmp_path / "dora.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 64),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 2),
               "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.zeros(64)}, dora)
    assert main(["lora", "add", str(dora), "--family", "flux2-klein"]) == 2
    assert "plain LoRA" in _one_line(capsys)
    assert not (tmp_path / "loras" / "dora.lora.json").exists()
    # kohya keys diffusers' converter does not know (it warns and drops them): refused, not half applied
    partial = tmp_path / "partial.safetensors"
    save_file({"lora_unet_single_blocks_0_linear2.lora_down.weight": torch.zeros(2, 256),
               "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.zeros(64, 2),
               "lora_unet_single_blocks_0_modulation_lin.lora_down.weight": torch.zeros(2, 64),
               "lora_unet_single_blocks_0_modulation_lin.lora_up.weight": torch.zeros(64, 2)}, partial)
    assert main(["lora", "add", str(partial)]) == 2
    line = _one_line(capsys)
    assert "left layers out" in line and "modulation_lin" in line
    assert not (tmp_path / "loras" / "partial.lora.json").exists()


def test_signed_lora_policy(library_loras, tmp_path_factory, tmp_path, capsys):
    _, bundle = variant_bundle(tmp_path_factory, "lat16-base-cfg")
    add(library_loras["fine"], "fine", "--bundle", str(bundle))
    assert main(["keys", "generate", "--out", str(tmp_path / "keys"), "--name", "Site"]) == 0
    assert main(["trust", "policy", "--require-signed-loras", "on"]) == 0
    capsys.readouterr()
    out = tmp_path / "s.png"
    args = ["generate", "--bundle", str(bundle), "--prompt", "x", "--steps", "1", "--width", "32", "--height",
            "32", "--lora", "fine", "--out", str(out)]
    assert main(args) == 2
    line = _one_line(capsys)
    assert "not signed" in line and "edgegen lora sign fine" in line and not out.exists()
    assert main(["lora", "sign", "fine", "--key", str(tmp_path / "keys" / "Site.key")]) == 0
    assert main(args) == 2 and "does not trust" in capsys.readouterr().err  # signed, but not by a trusted key
    assert main(["trust", "add", str(tmp_path / "keys" / "Site.pub")]) == 0
    assert main(["lora", "check", "fine", "--bundle", str(bundle)]) == 0
    assert "trusted" in capsys.readouterr().out
    assert main(args) == 0 and out.exists()
    # a record edited after signing (say, a different sha256 for a swapped file) no longer verifies
    rec = tmp_path / "loras" / "fine.lora.json"
    rec.write_text(rec.read_text().replace('"rank": 4', '"rank": 3'))
    assert main(args) == 2 and "does not match fine.lora.json" in capsys.readouterr().err


# ---------------------------------------------------------------- the API and batch


def test_api_lora_loader_takes_lora_name_from_the_library(klein_cfg, tmp_path):
    """ComfyUI's LoraLoader / LoraLoaderModelOnly by lora_name, per request, on one served bundle."""
    import requests

    from tests.test_server_helpers import start_server, t2i_graph, wait_history

    model, bundle, files = klein_cfg
    for name, path in files.items():
        add(path, name)
    ref = Reference(model, "flux2-klein", files)

    def graph(loras):
        g = t2i_graph(ckpt=bundle.name, seed=6, steps=3, width=64, height=48)
        g["3"]["inputs"]["cfg"] = 3.0
        src = ["4", 0]
        for i, (name, strength, kind) in enumerate(loras):
            node = f"1{i}"
            g[node] = {"class_type": kind, "inputs": {"lora_name": f"{name}.safetensors", "strength_model": strength,
                                                      "model": src}}
            if kind == "LoraLoader":
                g[node]["inputs"].update(strength_clip=1.0, clip=["4", 1])
            src = [node, 0]
        g["3"]["inputs"]["model"] = src
        return g

    with start_server(tmp_path / "srv", bundle) as s:
        cases = [[("brand-a", 0.8, "LoraLoader")], [("brand-b", 1.0, "LoraLoaderModelOnly")],
                 [("brand-a", 0.5, "LoraLoader"), ("brand-b", -0.4, "LoraLoaderModelOnly")]]
        for loras in cases:
            r = requests.post(f"{s.url}/prompt", json={"prompt": graph(loras)}, timeout=30)
            assert r.status_code == 200, r.text
            h = wait_history(s.url, r.json()["prompt_id"])
            img = h["outputs"]["9"]["images"][0]
            ours = np.asarray(Image.open(tmp_path / "srv" / "output" / img["subfolder"] / img["filename"]))
            expect = ref.image([(n, st) for n, st, _ in loras], "a red circle on a blue background", 6, 3, 3.0,
                               64, 48)
            assert psnr(ours, expect) >= 60, loras
        for bad, needle in (([("no-such", 1.0, "LoraLoader")], "no LoRA named 'no-such'"),
                            ([("brand-a", 50.0, "LoraLoaderModelOnly")], "strength_model 50.0 is outside")):
            r = requests.post(f"{s.url}/prompt", json={"prompt": graph(bad)}, timeout=30)
            assert r.status_code == 400, r.text
            err = r.json()["node_errors"]["10"]["errors"][0]
            assert needle in err["message"] + err["details"], err


def test_batch_catalogue_with_a_different_lora_per_row(klein_cfg, tmp_path):
    """The brand catalogue (prompt, style reference, brand LoRA, size per row) through edgegen batch: each row's
    image is diffusers' image with that row's reference and LoRA."""
    import csv

    from app.server.batch import run_batch
    from tests.test_server_helpers import DOCS, server_config

    model, bundle, files = klein_cfg
    for name, path in files.items():
        add(path, name)
    cfg = server_config(tmp_path / "srv", bundle)
    (tmp_path / "srv" / "input").mkdir(parents=True)
    style = Image.fromarray((np.indices((72, 88)).sum(0) % 7 * 36).astype(np.uint8)).convert("RGB")
    style.save(tmp_path / "srv" / "input" / "brand-style.png")
    rows = tmp_path / "rows.csv"
    with open(DOCS / "catalogue_brand_loras.csv", newline="") as f:
        table = list(csv.DictReader(f))
    for r in table:  # the documented catalogue, at the tiny bundle's size and name
        r.update(bundle=bundle.name, width=str(int(r["width"]) // 16), height=str(int(r["height"]) // 16))
    with open(rows, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    # the documented workflow with 6 steps: the base variant's default is 50 with CFG, for each row here and in
    # diffusers (the comparison is the same at any step count; 123 s of the suite was this test at 50)
    workflow = json.loads((DOCS / "catalogue_brand_workflow.json").read_text())
    workflow["1"]["inputs"]["steps"] = STEPS = 6
    (tmp_path / "workflow.json").write_text(json.dumps(workflow))
    res = run_batch(rows, tmp_path / "workflow.json", local_config=cfg, say=lambda m: None, show_progress=False)
    assert (res.done, res.failed) == (len(table), 0)
    assert len({r["lora"] for r in table}) >= 3  # different LoRAs (and none) on different rows
    ref = Reference(model, "flux2-klein", files)
    defaults = json.loads((bundle / "manifest.json").read_text())["defaults"]
    with open(tmp_path / "rows.results.csv", newline="") as f:
        results = list(csv.DictReader(f))
    from app.bundle.loras import parse_lora_choice

    for r, out in zip(table, results):
        choice = [parse_lora_choice(t.strip()) for t in r["lora"].split(";") if t.strip()]
        ours = np.asarray(Image.open(tmp_path / "srv" / "output" / out["images"]).convert("RGB"))
        expect = ref.image(choice, f"{r['product']}, studio product photo, brand style", int(r["seed"]),
                           STEPS, defaults["guidance"], int(r["width"]), int(r["height"]), image=[style])
        assert psnr(ours, expect) >= 60, r


# ---------------------------------------------------------------- the device path (fake CUDA: no GPU here)


def test_lora_inputs_go_to_the_device_once_per_choice_on_fake_cuda(tmp_path_factory, tmp_path, monkeypatch):
    """The engine backend's real session code on FAKE CUDA tensors (tests/_standin_engine.py): every LoRA input
    reaches the engine on the device with the choice's rank, is moved once per LoRA choice (not per step or per
    image), and a LoRA input left on the host is refused."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from app.bundle.manifest import load_bundle
    from app.runtime.engine.session import DeviceMismatch
    from app.runtime.pipelines import GenerationRequest, make_pipeline
    from app.runtime.pipelines.base import Pipeline
    from tests._standin_engine import StandInEngineBackend

    model, bundle_dir = variant_bundle(tmp_path_factory, "lat16-base-cfg")
    add(make_lora(model, "flux2-klein", tmp_path / "a", seed=1, **KLEIN_A), "a")
    add(make_lora(model, "flux2-klein", tmp_path / "b", seed=2, **KLEIN_B), "b")
    bundle = load_bundle(bundle_dir)
    backend = StandInEngineBackend(bundle)
    pipe = make_pipeline(bundle, backend)
    moved = []
    original = Pipeline.to_device
    monkeypatch.setattr(Pipeline, "to_device", lambda self, t: (moved.append(id(t)), original(self, t))[1])
    slots = bundle.components()["transformer"]["lora"]["slots"]

    def req(*loras):
        return GenerationRequest(prompt="a red circle", seed=1, steps=2, guidance=3.0, width=48, height=32,
                                 loras=tuple(loras))

    jobs = [pipe.prepare(r) for r in (req(("a", 0.5)), req(("a", 0.5)), req(("a", 0.5), ("b", 1.0)), req())]
    with FakeTensorMode(allow_non_fake_inputs=True):  # host work above, device work here, as the worker does
        runs = []
        for job in jobs:
            before = len(moved)
            pipe.execute(job)
            ctx = backend.contexts["transformer"]
            lora_ids = {id(v) for v in job.lora.values()}
            runs.append((sum(1 for i in moved[before:] if i in lora_ids), ctx.shapes["lora_a_0"][0]))
    # (LoRA tensors moved, rank the engine saw): A alone (rank 5), the same again (nothing moved), A + B
    # (rank 7), none (rank 1 of zeros)
    assert runs == [(2 * len(slots), 5), (0, 5), (2 * len(slots), 7), (2 * len(slots), 1)]

    monkeypatch.setattr(Pipeline, "lora_on_device", lambda self, job: dict(job.lora))  # left on the host
    job = pipe.prepare(req(("b", 1.0)))
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(DeviceMismatch, match="lora_a_0 is on cpu"):
        pipe.execute(job)


def test_selftest_checks_the_lora_inputs_on_every_backend_here(tmp_path_factory, tmp_path, capsys, monkeypatch):
    """`edgegen selftest` on a run-time LoRA bundle: a synthetic LoRA through every backend that ran, against
    the PyTorch reference's LoRA image, and that image must differ from the plain one. On a GPU the same check
    covers ONNX Runtime CUDA and the engines; here: PyTorch and ONNX Runtime CPU."""
    from app.planning import devices
    from tests._refs import tiny_references

    monkeypatch.setattr(devices.NvmlReader, "read", lambda self: [])
    model, bundle = variant_bundle(tmp_path_factory, "lat8-heads3-gqa")
    copy, refs = tiny_references(model, tmp_path)
    rc = main(["selftest", "--model", str(copy), "--references", str(refs), "--bundle", str(bundle)])
    out = " ".join(capsys.readouterr().out.split())
    assert rc == 0, out
    assert "PASS: 4 backend(s)" in out and "FAIL" not in out  # PyTorch, ORT CPU, and each again with the LoRA
    assert out.count("+ LoRA") == 2 and "(reference)" in out

    # a bundle without LoRA inputs says what would cover them
    plain = variant_bundle(tmp_path_factory, "lat8-heads3-gqa")[1]
    from app.site.selftest_lora import lora_outcomes

    class B:  # the same bundle's manifest without the LoRA record
        manifest = {"components": {"transformer": {}}}

    assert lora_outcomes(B(), [], [], [], tmp_path)[1][0][1].startswith("not run — the self-test bundle has no LoRA")
    assert plain.exists()
