"""Run-time LoRA: a library LoRA's tensors as the transformer's side-branch inputs (docs/LORA.md).

A bundle exported with --runtime-lora has, for each nn.Linear slot i of the transformer, inputs lora_a_<i>
(rank x in) and lora_b_<i> (out x rank); the graph adds B (A x) to the layer's output. Here a request's LoRAs
become those inputs: each LoRA's A, and its B times its peft scaling times the request's strength, stacked
along the rank axis, zeros where a LoRA does not touch a layer. No LoRA is rank 1 of zeros.

Files are read with diffusers' own LoRA loaders (Flux2KleinPipeline / StableDiffusion3Pipeline.lora_state_dict,
which convert kohya and ComfyUI layouts) and peft computes each layer's scaling, on a meta-device skeleton of
the LoRA's own layers: nothing of the model is loaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from app.bundle import loras as lib
from app.bundle.families import lora_input_names
from app.bundle.files import sha256_file
from app.errors import UsageError

PIPELINES = {"flux2-klein": "Flux2KleinPipeline", "sd3.5": "StableDiffusion3Pipeline"}
# Module names only one family has: how `lora add` tells a LoRA's family when neither --family nor --bundle says.
_FAMILY_MARKS = {"flux2-klein": ("single_transformer_blocks", "double_stream_modulation", "single_stream_modulation",
                                 "to_qkv_mlp_proj", "time_guidance_embed", ".linear_in.", ".linear_out.",
                                 "single_blocks", "double_blocks"),
                 "sd3.5": ("joint_blocks", "context_block", "x_block", ".ff.net.", ".ff_context.net.",
                           "time_text_embed", ".attn2.", "norm1_context")}


@dataclass(frozen=True)
class Factors:
    """One LoRA's layers: module -> (A (r x in), B (out x r) with peft's scaling folded in), float32, CPU."""

    layout: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.layers.values()), default=0)


def _layout(keys) -> str:
    keys = list(keys)
    if any(".lora_down.weight" in k for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    return "diffusers"


class _Dropped(logging.Handler):
    """Collects diffusers' warnings that a converter dropped keys (e.g. 'Unsupported keys for Kohya Flux2 LoRA
    conversion: [...]')."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "nsupported key" in msg or "not converted" in msg.lower() or "unexpected key" in msg.lower():
            self.messages.append(msg)


def guess_family(header: dict) -> str | None:
    keys = [k for k in header if k != "__metadata__"]
    found = {f for f, marks in _FAMILY_MARKS.items() if any(m in k for k in keys for m in marks)}
    return found.pop() if len(found) == 1 else None


def read_factors(path: Path, family: str) -> Factors:
    """The LoRA's per-layer (A, scaled B), through diffusers' loader for `family` and peft's scaling."""
    import diffusers

    header = lib.safetensors_header(path)  # not pickle, before anything parses it
    layout = _layout(header)
    cls = getattr(diffusers, PIPELINES[family])
    dropped = _Dropped()
    watched = logging.getLogger("diffusers")
    saved = (watched.handlers[:], watched.level)
    watched.handlers, watched.level = [dropped], min(watched.level or logging.WARNING, logging.WARNING)
    try:
        state, metadata = cls.lora_state_dict(str(path), return_lora_metadata=True)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise UsageError(f"{path} is not a LoRA diffusers can read for {lib.FAMILY_LABELS[family]} "
                         f"({str(e).splitlines()[0][:160]}); use a diffusers, kohya or ComfyUI LoRA for it") from None
    finally:
        watched.handlers, watched.level = saved
    if dropped.messages:  # diffusers' converters warn and drop keys they do not know; a LoRA must not lose layers
        raise UsageError(f"{path}: diffusers' {layout} converter left layers out ({dropped.messages[0][:200]}); "
                         "edgegen refuses a LoRA it cannot apply whole")
    other = sorted({k.split(".")[0] for k in state if not k.startswith("transformer.")})
    if other:
        raise UsageError(f"{path} also changes {', '.join(other)}; edgegen applies LoRAs to the transformer only "
                         "(its text encoders are compiled into the bundle): use a transformer-only LoRA")
    layers: dict[str, dict] = {}
    for k, v in state.items():
        module, _, kind = k[len("transformer."):].rpartition(".lora_")
        if kind not in ("A.weight", "B.weight") or v.ndim != 2:
            raise UsageError(f"{path} has {k}: edgegen runs plain LoRA (lora_A/lora_B matrices) only, not DoRA, "
                             "LoKr, LoRA biases or convolution LoRAs")
        layers.setdefault(module, {})[kind[0]] = v
    if not layers:
        raise UsageError(f"{path} has no transformer LoRA layers for {lib.FAMILY_LABELS[family]}")
    for module, ab in layers.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            raise UsageError(f"{path}: layer {module} lacks a matching lora_A/lora_B pair; the file is damaged")
    scaling = _peft_scaling(layers, state, metadata)
    out = {m: (ab["A"].float().contiguous(), (ab["B"].float() * scaling[m]).contiguous()) for m, ab in layers.items()}
    return Factors(layout, out)


def _peft_scaling(layers: dict, state: dict, metadata) -> dict[str, float]:
    """peft's scaling per layer (lora_alpha / r, rslora, rank and alpha patterns), as diffusers' load_lora_weights
    sets it: the LoRA loaded into a meta-device skeleton of its own layers."""
    from diffusers import ModelMixin
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.loaders.peft import PeftAdapterMixin
    from peft.tuners.lora import LoraLayer
    from torch import nn

    class Skeleton(ModelMixin, ConfigMixin, PeftAdapterMixin):
        def __init__(self):
            super().__init__()
            for name, ab in layers.items():
                parent = self
                for part in name.split(".")[:-1]:
                    if not hasattr(parent, part):
                        parent.add_module(part, nn.Module())
                    parent = getattr(parent, part)
                parent.add_module(name.split(".")[-1],
                                  nn.Linear(ab["A"].shape[1], ab["B"].shape[0], bias=False, device="meta"))

    sk = Skeleton()
    quiet = logging.getLogger("diffusers")
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)
    try:
        sk.load_lora_adapter(state, prefix="transformer", adapter_name="x", metadata=metadata,
                             low_cpu_mem_usage=True)
    finally:
        quiet.setLevel(level)
    return {n: float(m.scaling["x"]) for n, m in sk.named_modules() if isinstance(m, LoraLayer) and "x" in m.scaling}


# ---------------------------------------------------------------- the library


def add_to_library(file: Path, name: str | None = None, family: str | None = None, bundle=None,
                   folder: Path | None = None, overwrite: bool = False) -> lib.LoraRecord:
    """Check a LoRA file and copy it into the library with its record. `bundle` (a Bundle) gives the family and
    checks the shapes against its transformer now."""
    file, folder = Path(file), Path(folder or lib.library_dir())
    header = lib.safetensors_header(file)
    name = lib.check_name(name or file.name)
    if family is None:
        family = bundle.manifest["family"] if bundle is not None else guess_family(header)
        if family is None:
            raise UsageError(f"cannot tell from {file.name}'s layer names which family it is for; pass "
                             "--family flux2-klein or --family sd3.5 (or --bundle DIR)")
    if (folder / (name + lib.RECORD_SUFFIX)).exists() and not overwrite:
        raise UsageError(f"the library already has a LoRA named {name}; pick another --name or pass --overwrite")
    factors = read_factors(file, family)
    targets = {m: [int(a.shape[1]), int(b.shape[0]), int(a.shape[0])] for m, (a, b) in factors.layers.items()}
    data = {"name": name, "file": name + ".safetensors", "family": family, "layout": factors.layout,
            "rank": factors.rank, "targets": targets, "source_file": file.name,
            "added_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if bundle is not None:
        lora = bundle_lora(bundle.manifest)
        lib.check_against(_as_record(data, file), bundle.manifest["family"], lora and lora["slots"],
                          lora and lora["max_rank"], f"bundle {bundle.root}")
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / data["file"]
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        shutil.copyfile(file, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        sha = sha256_file(Path(tmp))
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    (folder / (name + lib.SIG_SUFFIX)).unlink(missing_ok=True)  # a new record is not what an old key signed
    return lib.write_record(folder, name, {**data, "sha256": sha, "size": dest.stat().st_size})


def _as_record(data: dict, path: Path) -> lib.LoraRecord:
    return lib.LoraRecord(data["name"], path, "", 0, data["family"], data["layout"], data["rank"], data["targets"],
                          data)


def bundle_lora(manifest: dict) -> dict | None:
    """The transformer's run-time LoRA record ({slots, max_rank, ...}), or None for a bundle without LoRA inputs."""
    return (manifest.get("components", {}).get("transformer") or {}).get("lora")


# ---------------------------------------------------------------- a request's LoRAs as inputs

_FACTORS: OrderedDict[str, Factors] = OrderedDict()  # sha256 -> factors, the few most recent
_FACTORS_KEEP = 8


def _factors(rec: lib.LoraRecord) -> Factors:
    if rec.sha256 in _FACTORS:
        _FACTORS.move_to_end(rec.sha256)
        return _FACTORS[rec.sha256]
    f = read_factors(rec.path, rec.family)
    _FACTORS[rec.sha256] = f
    while len(_FACTORS) > _FACTORS_KEEP:
        _FACTORS.popitem(last=False)
    return f


def check_choices(manifest: dict, choices, folder: Path | None = None, bundle: str = "the bundle"):
    """The records of a request's (name, strength) choices, checked against the bundle; no tensor is read.
    Raises UsageError with the fix for every problem that can be known before the work starts."""
    choices = tuple(choices)
    lora = bundle_lora(manifest)
    if not choices:
        return []
    seen = set()
    recs = []
    for name, strength in choices:
        lib.check_strength(strength, f"LoRA {name}: strength")
        rec = lib.find_record(name, folder)
        if rec.name in seen:
            raise UsageError(f"LoRA {rec.name} is chosen twice; choose it once with the strength you want")
        seen.add(rec.name)
        lib.check_against(rec, manifest["family"], lora and lora["slots"], lora and lora["max_rank"], bundle)
        recs.append(rec)
    total = sum(r.rank for r in recs)
    if total > int(lora["max_rank"]):
        raise UsageError(f"these LoRAs add up to rank {total} ({' + '.join(f'{r.name} {r.rank}' for r in recs)}), "
                         f"above the {lora['max_rank']} that {bundle}'s engine inputs allow; use fewer at once or "
                         f"re-export with --runtime-lora {total}")
    return recs


def lora_inputs(manifest: dict, choices, folder: Path | None = None,
                bundle: str = "the bundle") -> tuple[dict[str, torch.Tensor], list[dict]]:
    """(feeds, records) for a run-time LoRA bundle: the side-branch inputs on the CPU and what the PNG metadata
    and the audit log record (name, strength, sha256, rank, signature). Empty for a bundle without LoRA inputs
    when no LoRA is chosen."""
    lora = bundle_lora(manifest)
    recs = check_choices(manifest, choices, folder, bundle)
    if lora is None:
        return {}, []
    strengths = dict(choices)
    signatures = [lib.verify_record(r) for r in recs]  # sha256 and signature policy, before reading tensors
    records = [{"name": r.name, "strength": float(strengths[r.name]), "sha256": r.sha256, "rank": r.rank,
                "family": r.family, "signature": s.describe() if s.signed else "unsigned"}
               for r, s in zip(recs, signatures)]
    key = (id(lora), len(lora["slots"]), tuple((r["sha256"], r["strength"]) for r in records))
    if _FEEDS.get("key") != key:  # --count N, repeated draws: the same inputs, stacked once
        _FEEDS.clear()
        _FEEDS.update(key=key, feeds=_stack(lora["slots"], recs, strengths))
    return _FEEDS["feeds"], records


# The last choice's stacked inputs (for a real model at rank 64, some 0.5 GB): never two choices held at once.
_FEEDS: dict = {}


def _stack(slots: list[dict], recs: list, strengths: dict) -> dict[str, torch.Tensor]:
    factors = [_factors(r) for r in recs]
    ranks = [r.rank for r in recs]
    total = max(sum(ranks), 1)
    feeds = {}
    for i, slot in enumerate(slots):
        a = torch.zeros(total, int(slot["in"]))
        b = torch.zeros(int(slot["out"]), total)
        at = 0
        for rec, f, r in zip(recs, factors, ranks):
            layer = f.layers.get(slot["module"])
            if layer is not None:
                la, lb = layer
                a[at: at + la.shape[0]] = la
                b[:, at: at + la.shape[0]] = lb * strengths[rec.name]
            at += r
        name_a, name_b = lora_input_names(i)
        feeds[name_a], feeds[name_b] = a, b
    return feeds


# ----- LoRAs fused at export (--lora): export/lora.py and the PyTorch reference (torch_backend) ----------------
def read_fused_lora(path: Path, pipeline_class: str) -> dict:
    """A --lora file's state dict through the family pipeline's own LoRA loader (kohya / ComfyUI layouts too)."""
    import diffusers

    if path.suffix != ".safetensors" or not path.is_file():
        raise UsageError(f"--lora {path} must be an existing .safetensors file (pickle LoRAs are refused)")
    try:
        state = getattr(diffusers, pipeline_class).lora_state_dict(str(path))
    except Exception as e:  # diffusers raises many types for a malformed file
        raise UsageError(f"--lora {path} is not a LoRA diffusers can read ({str(e).splitlines()[0][:120]})") from None
    return state[0] if isinstance(state, tuple) else state


def fuse_loras(transformer: torch.nn.Module, pipeline_class: str, loras) -> list[dict]:
    """Load each LoRA with the pipeline's own LoRA loader, fuse it at its scale, drop the adapter layers.

    Fused weights are ordinary weights, so the ONNX, FP8 calibration and engines all see the brand style;
    the manifest records which file (sha256) at which scale."""
    records = []
    for i, (path, scale) in enumerate(loras):
        path = Path(path)
        state = read_fused_lora(path, pipeline_class)
        name = f"edgegen_lora_{i}"
        before = {n for n, _ in transformer.named_modules()}
        try:
            transformer.load_lora_adapter(state, prefix="transformer", adapter_name=name)
        except Exception as e:
            raise UsageError(f"--lora {path} does not fit this model's transformer ({str(e).splitlines()[0][:120]}); "
                             "use a LoRA trained for this model") from None
        if name not in getattr(transformer, "peft_config", {}) or {n for n, _ in transformer.named_modules()} == before:
            raise UsageError(f"--lora {path} matches no layer of this model's transformer; "
                             "use a LoRA trained for this model family")
        transformer.fuse_lora(lora_scale=scale, adapter_names=[name])
        transformer.unload_lora()
        records.append({"file": path.name, "sha256": sha256_file(path), "scale": scale,
                        "tensors": len(state)})
    return records
