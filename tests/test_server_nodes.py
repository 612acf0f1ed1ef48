"""/object_info, /models, /embeddings and /features (issue 26, first part): ComfyUI's shapes, compared with a
real ComfyUI's recorded answers (../shared/comfy-conformance/comfyui), and this server's bundles and LoRAs as
the loaders' choices."""

from __future__ import annotations

import json

import pytest
import requests
from test_server_helpers import ROOT, start_server

pytest.importorskip("aiohttp")
# A real ComfyUI's answers recorded on loopback on 2026-12-07 (copied from the project's shared conformance corpus,
# README.md there): the shapes are the truth, the values are ComfyUI's.
CORPUS = ROOT / "tests" / "data" / "comfy-conformance"


def recorded(name: str):
    return json.loads((CORPUS / name).read_text())["response"]


def _kind(spec) -> str:
    return "CHOICE" if isinstance(spec[0], list) else spec[0]


@pytest.fixture(scope="module")
def server(demo_bundle, tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("nodes"), demo_bundle) as s:
        yield s


def test_object_info_has_comfyuis_shape_for_every_node_both_know(server):
    ours = requests.get(f"{server.url}/object_info", timeout=30).json()
    truth = recorded("get_object_info.json")["body"]["json"]
    from app.server.graph import SUPPORTED

    assert set(ours) == set(SUPPORTED)
    shared = set(ours) & set(truth)
    assert len(shared) >= 8
    for name in shared:
        mine, real = ours[name], truth[name]
        assert set(real) - {"api_node", "deprecated", "experimental"} <= set(mine), name
        assert set(mine) <= set(real) | {"output_tooltips"}, name
        for section, inputs in real["input"].items():
            for key, spec in inputs.items():
                if key in mine["input"].get(section, {}):
                    assert _kind(mine["input"][section][key]) == _kind(spec), (name, key)
        assert set(real["input"]["required"]) <= set(mine["input"]["required"]), name  # no input a client sets is unknown
        assert mine["output"] == real["output"] and mine["output_node"] == real["output_node"], name
        assert mine["input_order"]["required"] == list(mine["input"]["required"]), name


def test_loader_choices_are_this_servers_bundles_and_library_loras(server, tmp_path):
    import torch
    from safetensors.torch import save_file

    from app.cli import main

    info = requests.get(f"{server.url}/object_info", timeout=30).json()
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["demo"]
    assert info["LoraLoader"]["input"]["required"]["lora_name"][0] == []
    f = tmp_path / "brand.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 64),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 2)}, f)
    assert main(["lora", "add", str(f), "--family", "flux2-klein"]) == 0
    one = requests.get(f"{server.url}/object_info/LoraLoaderModelOnly", timeout=30).json()
    assert list(one) == ["LoraLoaderModelOnly"]
    assert one["LoraLoaderModelOnly"]["input"]["required"]["lora_name"][0] == ["brand.safetensors"]
    assert requests.get(f"{server.url}/api/object_info/NoSuchNode", timeout=30).json() == {}
    assert requests.get(f"{server.url}/models/loras", timeout=30).json() == ["brand.safetensors"]
    assert requests.get(f"{server.url}/models/checkpoints", timeout=30).json() == ["demo"]


def test_models_embeddings_features_match_comfyui(server):
    for path, name in (("/models", "get_models.json"), ("/embeddings", "get_embeddings.json"),
                       ("/features", "get_features.json"), ("/models/checkpoints", "get_models_checkpoints.json")):
        r = requests.get(f"{server.url}{path}", timeout=30)
        truth = recorded(name)
        assert r.status_code == truth["status"], path
        got, want = r.json(), truth["body"]["json"]
        assert type(got) is type(want), path
        if isinstance(want, dict):
            assert set(got) == set(want), path
    assert requests.get(f"{server.url}/models", timeout=30).json() == recorded("get_models.json")["body"]["json"]
    assert requests.get(f"{server.url}/models/no-such-folder", timeout=30).status_code == 404
    assert requests.get(f"{server.url}/features", timeout=30).json()["supports_preview_metadata"] is False
