"""The catalogue of bad inputs a user or a site can cause (docs/BAD_INPUT.md): each ends in exactly one error line
on stderr with the documented exit code, no traceback, and nothing half-written left behind.

Other stderr lines may only be progress ([preflight] ..., [component] ...) or the generate header
(signature:, backend:). Keep this table and the one in docs/BAD_INPUT.md in step.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from app.cli import main
from tests.conftest import TINY_SIZE_ARGS

INFO_PREFIXES = ("[", "signature:", "backend:", "warning:", "seed ")  # progress and headers


@dataclass
class Ctx:
    tmp: Path
    model: Path  # the session's tiny Klein model (read-only: copy before changing it)
    bundle: Path  # the session's tiny Klein bundle (read-only)
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "out" / "b"

    @property
    def png(self) -> Path:
        return self.tmp / "a.png"

    def copy_model(self) -> Path:
        return shutil.copytree(self.model, self.tmp / "m") if not (self.tmp / "m").exists() else self.tmp / "m"

    def copy_bundle(self) -> Path:
        return shutil.copytree(self.bundle, self.tmp / "bc") if not (self.tmp / "bc").exists() else self.tmp / "bc"

    def export(self, *extra, model: Path | None = None) -> list[str]:
        return ["export", "--model", str(model or self.model), "--out", str(self.out), *TINY_SIZE_ARGS, *extra]

    def generate(self, *extra, bundle: Path | None = None) -> list[str]:
        return ["generate", "--bundle", str(bundle or self.bundle), "--prompt", "a red circle", "--width", "32",
                "--height", "32", "--steps", "1", "--out", str(self.png), *extra]


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]
    rc: int
    needle: str  # must appear in the error line


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _model_with(c: Ctx, fn) -> Path:
    m = c.copy_model()
    fn(m)
    return m


def _bundle_with(c: Ctx, fn) -> Path:
    b = c.copy_bundle()
    fn(b)
    return b


def _truncate(folder: Path) -> None:
    f = next(folder.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:100])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _hide(c: Ctx, module: str) -> None:
    c.monkeypatch.setitem(sys.modules, module, None)


def _key(c: Ctx) -> Path:
    from app.bundle.trust import generate_keypair

    return generate_keypair(c.tmp / "keys", "site")[0]


def _env(c: Ctx, **env) -> None:
    for k, v in env.items():
        c.monkeypatch.setenv(k, v)


def _no_space(c: Ctx) -> None:
    from app.runtime import images

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    c.monkeypatch.setattr(images, "atomic_write_bytes", full)


def _ort_fails(c: Ctx) -> None:
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    def fail(*_a, **_k):
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : Load model failed\nsecond line")

    c.monkeypatch.setattr(onnxruntime, "InferenceSession", fail)


def _bug(c: Ctx) -> None:
    from app import cli

    def boom(_args):
        raise TypeError("unsupported operand\nwith a second line")

    c.monkeypatch.setitem(cli.COMMANDS, "plan", boom)


def _library_lora(c: Ctx) -> str:
    """A small LoRA for the session's tiny Klein (one layer, rank 2), added to the test's own library."""
    import torch
    from safetensors.torch import save_file

    f = c.tmp / "brand.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 64),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 2)}, f)
    assert main(["lora", "add", str(f), "--family", "flux2-klein"]) == 0
    return "brand"


def _tiny_st() -> bytes:
    """A valid safetensors file whose layer names say nothing about its family."""
    import torch
    from safetensors.torch import save

    return save({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 64),
                 "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 2)})


def _then(setup, argv):
    """Run `setup(ctx)` (environment, monkeypatching), then build argv."""
    def build(c: Ctx) -> list[str]:
        setup(c)
        return argv(c)
    return build


SURROGATE = "a red \udcff circle"  # what Python makes of argv bytes that are not UTF-8

CASES = [
    # ---------------------------------------------------------------- export: the model folder
    Case("export-model-missing", lambda c: c.export(model=c.tmp / "nope"), 2, "does not exist"),
    Case("export-not-diffusers", lambda c: c.export(model=c.tmp), 2, "model_index.json"),
    Case("export-index-not-json", lambda c: c.export(model=_model_with(
        c, lambda m: _write(m / "model_index.json", "{oops"))), 2, "model_index.json"),
    Case("export-unknown-family", lambda c: c.export("--family", "sdxl"), 2, "unknown family"),
    Case("export-unsupported-pipeline", lambda c: c.export(model=_model_with(
        c, lambda m: _edit_json(m / "model_index.json", _class_name="StableDiffusionXLPipeline"))), 2,
        "StableDiffusionXLPipeline"),
    Case("export-pickle-only", lambda c: c.export(model=_model_with(c, lambda m: [
        f.rename(f.with_suffix(".bin")) for f in (m / "transformer").glob("*.safetensors")])), 2, "pickle"),
    Case("export-missing-component", lambda c: c.export(model=_model_with(
        c, lambda m: shutil.rmtree(m / "vae"))), 2, "vae"),
    Case("export-truncated-safetensors", lambda c: c.export(model=_model_with(
        c, lambda m: _truncate(m / "transformer"))), 2, "not a complete safetensors file"),
    Case("export-safetensors-header-garbage", lambda c: c.export(model=_model_with(
        c, lambda m: _write(next((m / "vae").glob("*.safetensors")), b"\x08\x00\x00\x00\x00\x00\x00\x00notjson!"))),
        2, "header is not JSON"),
    Case("export-config-not-json", lambda c: c.export(model=_model_with(
        c, lambda m: _write(m / "vae" / "config.json", "]"))), 2, "vae/config.json"),
    Case("export-defaults-not-json", lambda c: c.export(model=_model_with(
        c, lambda m: _write(m / "edgegen_defaults.json", "{\"steps\": 4,"))), 2, "edgegen_defaults.json is not valid"),
    Case("export-defaults-bad-value", lambda c: c.export(model=_model_with(
        c, lambda m: _write(m / "edgegen_defaults.json", json.dumps({"width": "big"})))), 2, "width = 'big'"),
    Case("export-unsupported-config", lambda c: c.export(model=_model_with(
        c, lambda m: _edit_json(m / "text_encoder" / "config.json", num_hidden_layers=20))), 2,
        "num_hidden_layers = 20"),
    # ---------------------------------------------------------------- export: options
    Case("export-precision-unknown", lambda c: c.export("--precision", "int3"), 2, "int3"),
    Case("export-precision-fp16", lambda c: c.export("--precision", "fp16"), 2, "cannot be exported in FP16"),
    Case("export-text-fp16", lambda c: c.export("--text-encoder-precision", "fp16"), 2, "T5 overflows"),
    Case("export-size-not-multiple", lambda c: c.export("--min-size", "30"), 2, "multiples of 4"),
    Case("export-min-above-max", lambda c: c.export("--min-size", "256", "--max-size", "64"), 2, "min <= max"),
    Case("export-size-not-number", lambda c: c.export("--max-size", "big"), 2, "not a whole number"),
    Case("export-out-exists", lambda c: c.export() if _write(c.out / "x", "keep") else [], 2, "already exists"),
    Case("export-rtx-without-sm", lambda c: c.export("--target", "tensorrt-rtx"), 2, "needs --sm"),
    Case("export-sm-garbage", lambda c: c.export("--target", "tensorrt-rtx", "--sm", "8x"), 2, "compute capability"),
    Case("export-fp8-on-sm86", lambda c: c.export("--target", "tensorrt-rtx", "--sm", "86", "--precision", "fp8"),
         2, "sm86"),
    Case("export-rtx-cannot-target-sm90", lambda c: c.export("--target", "tensorrt-rtx", "--sm", "90"), 2, "sm90"),
    Case("export-lora-missing", lambda c: c.export("--lora", str(c.tmp / "brand.safetensors:0.8")), 2,
         "brand.safetensors"),
    Case("export-lora-scale-inf", lambda c: c.export("--lora", "brand.safetensors:inf"), 2, "finite"),
    Case("export-calibration-not-utf8", lambda c: c.export("--precision", "fp8", "--calibration-prompts", str(
        _write(c.tmp / "p.txt", b"\xff\xfe\x00bad"))), 2, "calibration prompts"),
    Case("export-calibration-count-zero", lambda c: c.export("--calibration-count", "0"), 2, "at least 1"),
    Case("export-calibration-steps-zero", lambda c: c.export("--calibration-steps", "0"), 2, "at least 1"),
    Case("export-sign-key-missing", lambda c: c.export("--sign", str(c.tmp / "none.key")), 2, "does not exist"),
    # ---------------------------------------------------------------- export: the machine (preflight)
    Case("export-onnxruntime-missing", _then(lambda c: _hide(c, "onnxruntime"), lambda c: c.export()), 2,
         "onnxruntime is not usable"),
    Case("export-tensorrt-rtx-missing", _then(lambda c: _hide(c, "tensorrt_rtx"),
                                              lambda c: c.export("--target", "tensorrt-rtx", "--sm", "89")), 2,
         "TensorRT-RTX is not usable"),
    Case("export-modelopt-missing", _then(lambda c: _hide(c, "modelopt.onnx.quantization"),
                                          lambda c: c.export("--precision", "fp8")), 2, "ModelOpt"),
    Case("export-disk-full", _then(lambda c: c.monkeypatch.setattr("export.preflight.free_bytes", lambda p: 1024),
                                   lambda c: c.export()), 1, "not enough disk space"),
    Case("export-not-enough-ram", _then(lambda c: c.monkeypatch.setattr(
        "export.preflight.available_memory", lambda: 2**20), lambda c: c.export()), 1, "not enough memory"),
    # ---------------------------------------------------------------- generate
    Case("generate-bundle-missing", lambda c: c.generate(bundle=c.tmp / "nope"), 2, "does not exist"),
    Case("generate-no-manifest", lambda c: c.generate(bundle=_write(c.tmp / "e" / "x", "").parent), 2,
         "manifest.json"),
    Case("generate-manifest-not-json", lambda c: c.generate(bundle=_bundle_with(
        c, lambda b: _write(b / "manifest.json", "{"))), 2, "not valid JSON"),
    Case("generate-schema-99", lambda c: c.generate(bundle=_bundle_with(
        c, lambda b: _edit_json(b / "manifest.json", schema_version=99))), 2, "schema version 99"),
    Case("generate-tampered-file", lambda c: c.generate(bundle=_bundle_with(
        c, lambda b: _flip(b / "vae_decoder" / "model.onnx"))), 2, "sha256"),
    Case("generate-unlisted-file", lambda c: c.generate(bundle=_bundle_with(
        c, lambda b: _write(b / "evil.so", "x"))), 2, "does not list"),
    Case("generate-symlink", lambda c: c.generate(bundle=_bundle_with(
        c, lambda b: os.symlink("/etc/passwd", b / "link"))), 2, "symlink"),
    Case("generate-guidance-nan", lambda c: c.generate("--guidance", "nan"), 2, "not a finite number"),
    Case("generate-guidance-inf", lambda c: c.generate("--guidance", "inf"), 2, "not a finite number"),
    Case("generate-guidance-text", lambda c: c.generate("--guidance", "high"), 2, "not a number"),
    Case("generate-prompt-not-utf8", lambda c: c.generate("--prompt", SURROGATE), 2, "not UTF-8"),
    Case("generate-negative-not-utf8", lambda c: c.generate("--negative-prompt", SURROGATE), 2, "not UTF-8"),
    Case("generate-width-not-multiple", lambda c: c.generate("--width", "62"), 2, "multiple of 4"),
    Case("generate-width-outside", lambda c: c.generate("--width", "512"), 2, "outside"),
    Case("generate-steps-zero", lambda c: c.generate("--steps", "0"), 2, "--steps 0"),
    Case("generate-seed-negative", lambda c: c.generate("--seed", "-1"), 2, "--seed -1"),
    Case("generate-count-zero", lambda c: c.generate("--count", "0"), 2, "--count 0"),
    Case("generate-out-not-png", lambda c: c.generate("--out", str(c.tmp / "a.jpg")), 2, ".png"),
    Case("generate-out-folder-missing", lambda c: c.generate("--out", str(c.tmp / "no" / "a.png")), 2,
         "does not exist"),
    Case("generate-count-huge", lambda c: c.generate("--count", "100000000000"), 2, "must be between 1 and"),
    Case("generate-seed-plus-count-too-big", lambda c: c.generate("--seed", str(2**63 - 2), "--count", "3"), 2,
         "largest seed"),
    Case("generate-out-not-writable", lambda c: c.generate("--out", "/proc/edgegen-test.png"), 2,
         "cannot write into /proc"),
    Case("serve-previews-with-cluster", lambda c: ["serve", "--port", "0", "--cluster", "local",
                                                   "--preview-method", "auto"], 2, "cluster replicas send no previews"),
    Case("generate-backend-unknown", lambda c: c.generate("--backend", "cuda9"), 2, "cuda9"),
    Case("generate-unsigned-but-required", _then(lambda c: _env(c, EDGEGEN_REQUIRE_SIGNED="1"),
                                                 lambda c: c.generate()), 2, "not signed"),
    Case("generate-require-signed-garbage", _then(lambda c: _env(c, EDGEGEN_REQUIRE_SIGNED="maybe"),
                                                  lambda c: c.generate()), 2, "EDGEGEN_REQUIRE_SIGNED"),
    Case("generate-disk-full-writing-png", _then(_no_space, lambda c: c.generate()), 1, "No space left"),
    Case("generate-onnxruntime-fails", _then(_ort_fails, lambda c: c.generate()), 1, "ONNX Runtime failed"),
    # ---------------------------------------------------------------- run-time LoRA (docs/LORA.md)
    Case("generate-lora-unknown", lambda c: c.generate("--lora", "nope"), 2, "no LoRA named 'nope'"),
    Case("generate-lora-strength-nan", lambda c: c.generate("--lora", "brand:nan"), 2, "strength nan"),
    Case("generate-lora-no-inputs", lambda c: c.generate("--lora", _library_lora(c)), 2, "--runtime-lora"),
    Case("lora-add-missing", lambda c: ["lora", "add", str(c.tmp / "none.safetensors")], 2, "does not exist"),
    Case("lora-add-pickle", lambda c: ["lora", "add", str(_write(c.tmp / "x.safetensors", b"\x80\x02}q\x00."))],
         2, "pickle"),
    Case("lora-add-family-unknown", lambda c: ["lora", "add", str(_write(c.tmp / "x.safetensors", _tiny_st()))],
         2, "--family"),
    Case("lora-require-signed-garbage", _then(lambda c: _env(c, EDGEGEN_REQUIRE_SIGNED_LORAS="maybe"),
                                              lambda c: ["lora", "check", _library_lora(c)]), 2,
         "EDGEGEN_REQUIRE_SIGNED_LORAS"),
    # ---------------------------------------------------------------- plan
    Case("plan-truncated-safetensors", lambda c: ["plan", "--model", str(_model_with(
        c, lambda m: _truncate(m / "text_encoder")))], 2, "not a complete safetensors file"),
    Case("plan-unknown-gpu", lambda c: ["plan", "--bundle", str(c.bundle), "--gpu", "Voodoo 5"], 2, "Voodoo"),
    Case("plan-model-and-bundle", lambda c: ["plan", "--model", str(c.model), "--bundle", str(c.bundle)], 2,
         "not allowed with"),
    Case("plan-bundle-missing", lambda c: ["plan", "--bundle", str(c.tmp / "nope")], 2, "does not exist"),
    Case("plan-defaults-not-json", lambda c: ["plan", "--model", str(_model_with(
        c, lambda m: _write(m / "model_index.json", "[")))], 2, "model_index.json"),
    # ---------------------------------------------------------------- sign and trust
    Case("sign-key-missing", lambda c: ["sign", "--bundle", str(c.copy_bundle()), "--key", str(c.tmp / "k")], 2,
         "does not exist"),
    Case("sign-not-a-key", lambda c: ["sign", "--bundle", str(c.copy_bundle()), "--key", str(
        _write(c.tmp / "k.key", "hello"))], 2, "not a PEM private key"),
    Case("sign-tampered-bundle", lambda c: ["sign", "--bundle", str(_bundle_with(
        c, lambda b: _flip(b / "vae_decoder" / "model.onnx"))), "--key", str(_key(c))], 2, "sha256"),
    Case("trust-add-missing", lambda c: ["trust", "add", str(c.tmp / "none.pub")], 2, "does not exist"),
    Case("trust-add-not-a-key", lambda c: ["trust", "add", str(_write(c.tmp / "x.pub", "nope"))], 2,
         "not a public key"),
    Case("trust-remove-unknown", lambda c: ["trust", "remove", "abcdef12"], 2, "no trusted key"),
    Case("trust-policy-damaged", lambda c: ["trust", "policy"] if _write(
        Path(os.environ["EDGEGEN_CONFIG_DIR"]) / "policy.json", "{") else [], 2, "not a valid edgegen policy"),
    # ---------------------------------------------------------------- app start
    Case("app-bundle-missing", lambda c: ["app", "--bundle", str(c.tmp / "nope")], 2, "does not exist"),
    Case("app-bundle-damaged", lambda c: ["app", "--bundle", str(_bundle_with(
        c, lambda b: _write(b / "manifest.json", "{")))], 2, "not valid JSON"),
    Case("app-no-display", _then(lambda c: [c.monkeypatch.delenv(k, raising=False) for k in
                                            ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")],
                                 lambda c: ["app"]), 2, "no display"),
    # ---------------------------------------------------------------- anything else: one line and a report
    Case("unexpected-bug", _then(_bug, lambda c: ["plan", "--bundle", str(c.bundle)]), 1, "full report"),
]


def test_the_table_is_large_enough():
    assert len(CASES) > 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, klein_model, klein_bundle, tmp_path, monkeypatch, capsys):
    log = tmp_path / "log"
    monkeypatch.setenv("EDGEGEN_LOG_DIR", str(log))
    ctx = Ctx(tmp_path, klein_model, klein_bundle, monkeypatch)
    argv = case.argv(ctx)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(INFO_PREFIXES)]
    assert len(errors) == 1 and errors[0].startswith("edgegen: error: "), err
    assert rc == case.rc, err
    assert case.needle in errors[0], errors[0]
    # exit 1 names a full report, which holds the traceback; exit 2 writes none
    if rc == 1:
        reports = list(log.glob("report-*.txt"))
        assert len(reports) == 1 and str(reports[0]) in errors[0]
        assert "Traceback" in reports[0].read_text() and "argv" in reports[0].read_text()
    else:
        assert not log.exists() or not list(log.iterdir())
    # nothing half-written
    assert not ctx.png.exists()
    if argv and argv[0] == "export" and case.id != "export-out-exists":
        assert not ctx.out.exists()
    leftovers = [p for p in tmp_path.rglob("*") if ".partial-" in p.name or p.name.endswith(".tmp")
                 or ".old-" in p.name]
    assert leftovers == []
    if argv and argv[0] == "sign":
        assert not (ctx.tmp / "bc" / "manifest.sig").exists()
