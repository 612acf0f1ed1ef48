"""The opt-in export cache (export/cache.py): an identical component is traced once; any change to its weights,
config, class, precision, LoRAs or trace sample misses; a damaged entry is exported afresh; off when unset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from app.bundle.families import FAMILIES, read_model_index
from app.bundle.modelfolder import ModelFolder
from export import cache

SPEC = FAMILIES["sd3.5"].component("text_encoder")


def _folder(path: Path, index: dict | None = None):
    return SimpleNamespace(path=path, family=FAMILIES["sd3.5"],
                           index=index or {"text_encoder": ["transformers", "CLIPTextModelWithProjection"]})


def _fake_model(root: Path) -> Path:
    (root / "text_encoder").mkdir(parents=True)
    (root / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 32}))
    (root / "text_encoder" / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    return root


def test_key_changes_with_everything_that_shapes_the_graph(tmp_path):
    sample = {"input_ids": torch.arange(12).reshape(2, 6)}
    base = cache.graph_key(_folder(_fake_model(tmp_path / "a")), SPEC, "fp32", sample)
    # the same files in another folder: the same graph
    assert cache.graph_key(_folder(_fake_model(tmp_path / "b")), SPEC, "fp32", sample) == base

    def changed(edit) -> str:
        root = _fake_model(tmp_path / f"m{len(list(tmp_path.iterdir()))}")
        args = edit(root)
        args = args if isinstance(args, dict) else {}  # file edits return None or a byte count
        return cache.graph_key(args.get("folder", _folder(root)), args.get("spec", SPEC),
                               args.get("precision", "fp32"), args.get("sample", sample), args.get("loras", ()))

    def flip_weight_byte(root):
        w = root / "text_encoder" / "model.safetensors"
        data = bytearray(w.read_bytes())
        data[100] ^= 1
        w.write_bytes(bytes(data))

    keys = [
        changed(flip_weight_byte),
        changed(lambda r: (r / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 33}))),
        changed(lambda r: (r / "text_encoder" / "extra.json").write_text("{}")),
        changed(lambda r: {"folder": _folder(r, {"text_encoder": ["transformers", "CLIPTextModel"]})}),
        changed(lambda r: {"precision": "bf16"}),
        changed(lambda r: {"sample": {"input_ids": torch.arange(12).reshape(2, 6) + 1}}),
        changed(lambda r: {"sample": {"input_ids": torch.arange(12).reshape(3, 4)}}),
        changed(lambda r: {"sample": {"input_ids": torch.arange(12).reshape(2, 6).int()}}),
        changed(lambda r: {"spec": FAMILIES["sd3.5"].component("text_encoder_2")}),
    ]
    assert len({base, *keys}) == len(keys) + 1


def test_key_covers_loras_of_the_transformer(tmp_path):
    spec = FAMILIES["sd3.5"].component("transformer")
    root = tmp_path / "m"
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text("{}")
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"lora-a")
    folder = _folder(root, {"transformer": ["diffusers", "SD3Transformer2DModel"]})
    sample = {"timestep": torch.ones(2)}
    keys = {cache.graph_key(folder, spec, "fp32", sample, ()),
            cache.graph_key(folder, spec, "fp32", sample, ((lora, 0.7),)),
            cache.graph_key(folder, spec, "fp32", sample, ((lora, 0.8),))}
    lora.write_bytes(b"lora-b")
    keys.add(cache.graph_key(folder, spec, "fp32", sample, ((lora, 0.7),)))
    assert len(keys) == 4


def _export(model: Path, out: Path):
    from export.exporter import export_one

    folder = ModelFolder(model, read_model_index(model), FAMILIES["sd3.5"])
    return export_one(folder, SPEC, out, progress=lambda m: None)


def test_identical_component_is_traced_once_and_a_changed_weight_misses(sd3_model, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    import export.exporter as ex

    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    traced = []
    real = ex.trace_component
    monkeypatch.setattr(ex, "trace_component", lambda *a: traced.append(a[0].name) or real(*a))

    first, _ = _export(sd3_model, tmp_path / "1")
    second, _ = _export(sd3_model, tmp_path / "2")
    assert traced == ["text_encoder"]  # the second export reused the graph...
    assert (tmp_path / "1" / "model.onnx").read_bytes() == (tmp_path / "2" / "model.onnx").read_bytes()
    assert second["fidelity"]["cosine"] > 0.999 and second["inputs"] == first["inputs"]  # ...and checked it

    changed = shutil.copytree(sd3_model, tmp_path / "changed")
    weights = next((changed / "text_encoder").glob("*.safetensors"))
    state = load_file(weights)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 2)
    state[name] = state[name] * 1.5
    save_file(state, weights)
    _export(changed, tmp_path / "3")
    assert traced == ["text_encoder", "text_encoder"]
    assert (tmp_path / "3" / "model.onnx").read_bytes() != (tmp_path / "1" / "model.onnx").read_bytes()

    # a damaged entry is not served: the component is exported afresh
    for f in (tmp_path / "cache").glob("*/model.onnx"):
        f.write_bytes(b"damaged")
    _export(sd3_model, tmp_path / "4")
    assert traced == ["text_encoder"] * 3
    assert (tmp_path / "4" / "model.onnx").read_bytes() == (tmp_path / "1" / "model.onnx").read_bytes()


SECOND_EXPORTER = """
import sys, torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.test_export_cache import SPEC, _folder
from export import cache
print("looking", flush=True)
found = cache.lookup(_folder(Path(sys.argv[2])), SPEC, "fp32", {"x": torch.ones(3)}, (), Path(sys.argv[3]))
print("hit" if found.hit else "miss")
"""


def test_a_second_exporter_waits_for_the_first_and_reuses_its_graph(tmp_path, monkeypatch):
    """pytest-xdist workers exporting the same component at once: the second waits, then copies the graph."""
    import os
    import subprocess
    import sys
    import time

    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    cache._code_and_versions.cache_clear()  # the child hashes the sources as they are now: so must we
    model = _fake_model(tmp_path / "m")
    first = cache.lookup(_folder(model), SPEC, "fp32", {"x": torch.ones(3)}, (), tmp_path / "1")
    assert not first.hit and first.claim is not None
    root = Path(__file__).resolve().parents[1]
    second = subprocess.Popen([sys.executable, "-c", SECOND_EXPORTER, str(root), str(model), str(tmp_path / "2")],
                              stdout=subprocess.PIPE, text=True, env={**os.environ})
    assert second.stdout.readline().split() == ["looking"]
    time.sleep(2)
    assert second.poll() is None  # waiting for the first exporter (without the lock it would have missed)
    (tmp_path / "1" / "model.onnx").parent.mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(b"graph")
    first.store()
    out, _ = second.communicate(timeout=120)
    assert out.split() == ["hit"] and (tmp_path / "2" / "model.onnx").read_bytes() == b"graph"


def test_off_unless_the_variable_names_a_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(cache.ENV, raising=False)
    found = cache.lookup(_folder(_fake_model(tmp_path)), SPEC, "fp32", {"x": torch.ones(1)}, (), tmp_path / "o")
    assert not found.hit and found.entry is None
    found.store()
    assert not (tmp_path / "o").exists()


@pytest.fixture(autouse=True)
def _no_stray_cache(monkeypatch):
    """Nothing here writes to the run's shared cache."""
    monkeypatch.delenv(cache.ENV, raising=False)
