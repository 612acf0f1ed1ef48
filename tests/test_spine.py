"""Export through the CLI, generate through the CLI, and compare with diffusers' own pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from app.bundle.manifest import load_bundle
from app.cli import main
from app.runtime.images import psnr, read_metadata  # noqa: F401  (psnr: re-used by other tests)


def diffusers_image(model, prompt, seed, steps, guidance, width, height, negative=None) -> np.ndarray:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, local_files_only=True)
    kwargs = {"negative_prompt": negative} if negative is not None else {}
    out = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images[0]
    return (out * 255).round().astype(np.uint8)


CASES = [  # prompt, seed, width, height: a non-square size and an odd token grid
    ("a red circle on a blue background", 7, 64, 96),
    ("portrait of a nurse, soft light", 11, 80, 48),
]


@pytest.mark.parametrize("prompt,seed,width,height", CASES)
def test_klein_bundle_reproduces_diffusers(klein_model, klein_bundle, tmp_path, prompt, seed, width, height):
    out = tmp_path / "k.png"
    rc = main(["generate", "--bundle", str(klein_bundle), "--prompt", prompt, "--seed", str(seed), "--steps", "4",
               "--guidance", "1.0", "--width", str(width), "--height", str(height), "--out", str(out),
               "--backend", "onnxruntime"])
    assert rc == 0
    ours = np.asarray(Image.open(out).convert("RGB"))
    ref = diffusers_image(klein_model, prompt, seed, 4, 1.0, width, height)
    assert ours.shape == ref.shape == (height, width, 3)
    assert ours.std() > 5  # a real image, not a constant
    assert psnr(ours, ref) >= 60


@pytest.mark.parametrize("prompt,seed,width,height", CASES)
def test_sd3_bundle_reproduces_diffusers_with_cfg(sd3_model, sd3_bundle, tmp_path, prompt, seed, width, height):
    out = tmp_path / "s.png"
    rc = main(["generate", "--bundle", str(sd3_bundle), "--prompt", prompt, "--negative-prompt", "blurry",
               "--seed", str(seed), "--steps", "5", "--guidance", "4.5", "--width", str(width), "--height",
               str(height), "--out", str(out)])
    assert rc == 0
    ours = np.asarray(Image.open(out).convert("RGB"))
    ref = diffusers_image(sd3_model, prompt, seed, 5, 4.5, width, height, negative="blurry")
    assert psnr(ours, ref) >= 60
    # a different seed must give a different image, or the comparison above proves nothing
    other = diffusers_image(sd3_model, prompt, seed + 1, 5, 4.5, width, height, negative="blurry")
    assert psnr(ours, other) < 40


def test_torch_reference_backend_matches_onnx(klein_bundle, tmp_path):
    a, b = tmp_path / "ort.png", tmp_path / "torch.png"
    common = ["generate", "--bundle", str(klein_bundle), "--prompt", "green triangle", "--seed", "3",
              "--width", "64", "--height", "64"]
    assert main([*common, "--out", str(a), "--backend", "onnxruntime"]) == 0
    assert main([*common, "--out", str(b), "--backend", "torch"]) == 0
    assert psnr(np.asarray(Image.open(a)), np.asarray(Image.open(b))) >= 60
    assert read_metadata(b)["backend"] == "torch"


def test_manifest_records_what_the_contract_asks(klein_bundle, klein_model):
    b = load_bundle(klein_bundle)
    m = b.manifest
    assert m["schema_version"] == 1 and m["family"] == "flux2-klein" and m["precision"] == "fp32"
    assert set(m["components"]) == {"text_encoder", "transformer", "vae_decoder", "vae_encoder"}  # Klein: encoder on
    for name, comp in m["components"].items():
        assert comp["fidelity"]["cosine"] > 0.9999 and comp["fidelity"]["max_abs_err"] < 1e-3
        assert len(comp["fidelity"]["shapes"]) == 2  # checked on two shapes
        assert comp["onnx"] in m["files"] and len(m["files"][comp["onnx"]]) == 64
        assert all(i["dtype"] for i in comp["inputs"])
    tr = m["components"]["transformer"]["inputs"]
    assert [i["name"] for i in tr] == ["hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids"]
    assert tr[0]["shape"][:2] == ["batch", "img_seq"]  # dynamic batch and sequence
    assert m["defaults"] == {"steps": 4, "guidance": 1.0, "width": 256, "height": 256}
    assert "tokenizer/tokenizer.json" in m["files"] and m["scheduler"] in m["files"]
    assert m["source"]["model_index_sha256"] and m["exporter"]["torch"]
    # self-contained: nothing points back into the model folder except the recorded identity
    assert str(klein_model) not in json.dumps({k: v for k, v in m.items() if k != "source"})


def test_count_writes_one_file_per_seed_with_metadata(klein_bundle, tmp_path, capsys):
    out = tmp_path / "batch.png"
    rc = main(["generate", "--bundle", str(klein_bundle), "--prompt", "", "--seed", "40", "--count", "2",
               "--width", "32", "--height", "32", "--out", str(out)])
    assert rc == 0
    files = [tmp_path / "batch-40.png", tmp_path / "batch-41.png"]
    assert all(f.is_file() for f in files)
    metas = [read_metadata(f) for f in files]
    assert [m["seed"] for m in metas] == [40, 41]
    assert metas[0]["prompt"] == "" and metas[0]["steps"] == 4 and metas[0]["precision"] == "fp32"
    with Image.open(files[0]) as im:
        assert "Seed: 40" in im.text["parameters"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(files[-1])


def test_prompt_embeddings_are_reused_across_seeds_and_only_then(sd3_bundle):
    """--count N and repeated draws encode a prompt once; the images are the ones a fresh pipeline draws."""
    from app.runtime.ort_backend import OrtBackend
    from app.runtime.pipelines import GenerationRequest, make_pipeline

    bundle = load_bundle(sd3_bundle)
    calls: list[str] = []

    class Counting(OrtBackend):
        def run(self, component, inputs):
            calls.append(component)
            return super().run(component, inputs)

    pipe = make_pipeline(bundle, Counting(bundle))
    long_prompt = "a lighthouse " * 60  # > 77 CLIP tokens: a truncation warning that must survive reuse
    req = lambda **k: GenerationRequest(**{"prompt": long_prompt, "negative_prompt": "blurry", "seed": 1,  # noqa: E731
                                           "steps": 2, "guidance": 4.5, "width": 32, "height": 32, **k})
    first = pipe.generate(req())
    encoders = lambda: sum(c.startswith("text_encoder") for c in calls)  # noqa: E731
    per_prompt = encoders()
    assert per_prompt == 6  # CLIP-L, CLIP-G, T5 for the prompt and for the negative prompt (CFG)
    second = pipe.generate(req(seed=2))
    assert encoders() == per_prompt  # reused
    assert second.warnings == first.warnings and any("CLIP" in w for w in first.warnings)
    fresh = make_pipeline(bundle, OrtBackend(bundle)).generate(req(seed=2))
    assert np.array_equal(second.image, fresh.image)
    assert not np.array_equal(first.image, second.image)
    for changed in (dict(prompt="a barn"), dict(negative_prompt="dark"), dict(guidance=1.0)):
        before = encoders()
        out = pipe.generate(req(**changed))
        assert encoders() > before, changed
        assert np.array_equal(out.image, make_pipeline(bundle, OrtBackend(bundle)).generate(req(**changed)).image)


def test_interrupted_export_leaves_nothing_that_loads(sd3_model, tmp_path, monkeypatch):
    import export.exporter as ex

    def boom(*a, **k):
        raise RuntimeError("simulated crash during export")

    monkeypatch.setattr(ex, "_check", boom)
    with pytest.raises(RuntimeError):
        ex.export_bundle(ex.ExportOptions(model=sd3_model, out=tmp_path / "b", min_size=32, max_size=256),
                         progress=lambda m: None)
    assert not (tmp_path / "b").exists()
    assert list(tmp_path.iterdir()) == []
