"""The `edgegen` command: one entry point, errors caught once and shown as a sentence with the fix."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from app import __version__
from app.argtypes import whole
from app.errors import EdgegenError, UsageError, one_line, write_report


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exit code 2, without the usage dump."""

    def error(self, message: str):
        raise UsageError(f"{message} (see: {self.prog} --help)")


_size = whole(1, what="whole number of pixels")
_count = whole(1)


def _finite(value: str) -> float:
    """A float that is a number: nan and inf would reach the sampler and draw black or NaN images."""
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"'{value}' is not a finite number; give e.g. 1.0 or 7.0")
    return v


def _lora_choice(value: str) -> tuple[str, float]:
    from app.bundle.loras import parse_lora_choice

    try:
        return parse_lora_choice(value)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _text(value: str) -> str:
    """Prompt text: argv bytes that are not UTF-8 arrive as lone surrogates, which no tokenizer can read."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("holds bytes that are not UTF-8 text; set a UTF-8 locale or "
                                         "re-encode the prompt as UTF-8") from None
    return value


def _controlnet(value: str) -> tuple[str, Path]:
    name, sep, folder = value.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=DIR, e.g. canny=/models/sd35-controlnet-canny")
    return name, Path(folder)


def _control(value: str):
    from app.runtime.controls import parse_control

    try:
        return parse_control(value)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--control {value!r}: ")) from None


def _lora(value: str) -> tuple[Path, float]:
    """FILE[:SCALE], split at the LAST colon and only when what follows parses as a number, so Windows paths
    (C:\\brand.safetensors:0.8) and file names holding colons keep their colons."""
    path, sep, scale = value.rpartition(":")
    if sep and path and not Path(value).exists():
        try:
            s = float(scale)
        except ValueError:
            return Path(value), 1.0
        if not math.isfinite(s):
            raise argparse.ArgumentTypeError(f"LoRA scale in '{value}' is not a finite number; use FILE[:SCALE]")
        return Path(path), s
    return Path(value), 1.0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgegen", description="Offline image generation with TensorRT engines.")
    p.add_argument("--version", action="version", version=f"edgegen {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    e = sub.add_parser("export", help="model folder -> engine bundle")
    e.add_argument("--model", type=Path, required=True, help="local diffusers model folder (model_index.json)")
    e.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    e.add_argument("--family", default="auto", help="auto, flux2-klein or sd3.5")
    e.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "fp8"])
    e.add_argument("--text-encoder-precision", choices=["fp32", "bf16", "fp16", "fp8"],
                   help="default: bf16 with --precision bf16, else fp32; fp8 quantizes the text encoders too "
                        "(calibrated on --calibration-prompts)")
    e.add_argument("--target", choices=["onnx", "tensorrt-rtx", "tensorrt"], help="default: onnx, or the engine "
                   "flavour for --gpu")
    e.add_argument("--gpu", help='export what the plan chooses for this card: auto, a name such as "RTX 4090", or '
                   "smXY:GiB (per-component precision, engine target and compute capability)")
    e.add_argument("--sm", default="", help="compute capabilities for engines, e.g. 89,120")
    e.add_argument("--min-size", type=_size)
    e.add_argument("--max-size", type=_size)
    e.add_argument("--calibration-prompts", type=Path, help="FP8 calibration prompts, one per line")
    e.add_argument("--calibration-size", type=_size, help="FP8 calibration resolution in pixels")
    e.add_argument("--calibration-count", type=_count, default=8, help="FP8 calibration prompts to sample")
    e.add_argument("--calibration-steps", type=_count, help="sampler steps of each FP8 calibration and check image "
                   "(default: the model's default steps; fewer keep CPU calibration of SD3.5 to minutes)")
    e.add_argument("--fp8-path", choices=["auto", "onnx", "torch"], default="auto",
                   help="how the transformer becomes FP8: onnx (ModelOpt ONNX PTQ on the FP32 graph), torch (ModelOpt "
                        "calibrates the BF16 module in PyTorch; never holds FP32 weights), auto: onnx when it fits")
    e.add_argument("--lora", type=_lora, action="append", default=[], metavar="FILE[:SCALE]",
                   help="fuse a LoRA into the transformer at export (one brand baked in)")
    e.add_argument("--runtime-lora", type=whole(1, 1024), default=0, metavar="MAX_RANK",
                   help="give the transformer LoRA inputs, so any LoRA from the site library can be chosen per "
                        "request (generate --lora NAME[:STRENGTH]); MAX_RANK is the total rank of the LoRAs one "
                        "request may combine, e.g. 64 (docs/LORA.md)")
    e.add_argument("--controlnet", type=_controlnet, action="append", default=[], metavar="NAME=DIR",
                   help="SD3.5: add a diffusers SD3ControlNetModel folder as ControlNet NAME (repeat for several of "
                        "the same num_layers); a name starting canny or blur picks that preprocessor "
                        "(docs/CONTROLNET.md)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing bundle once the new one is complete")
    e.add_argument("--sign", type=Path, metavar="KEYFILE", help="sign the finished bundle with this private key")
    e.add_argument("--accept-low-fidelity", action="store_true",
                   help="keep components below the fidelity thresholds (docs/BAD_INPUT.md); recorded in the manifest")
    e.add_argument("--skip-memory-check", action="store_true", help="export even when the RAM estimate exceeds what is free")
    enc = e.add_mutually_exclusive_group()
    enc.add_argument("--with-encoder", dest="with_encoder", action="store_true", default=None,
                     help="export the VAE encoder too (images as input: Klein references, SD3.5 image-to-image); "
                          "the default for both families")
    enc.add_argument("--no-encoder", dest="with_encoder", action="store_false",
                     help="leave the VAE encoder out (a smaller bundle that only generates from prompts)")

    g = sub.add_parser("generate", help="prompt -> PNG")
    g.add_argument("--bundle", type=Path, required=True)
    g.add_argument("--prompt", required=True, type=_text)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--negative-prompt", default="", type=_text)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", type=_finite)
    g.add_argument("--width", type=_size)
    g.add_argument("--height", type=_size)
    g.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "torch"])
    g.add_argument("--model", type=Path, help="source model folder for --backend torch (default: as recorded)")
    g.add_argument("--count", type=int, default=1)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (CUDA numbering)")
    g.add_argument("--image", type=Path, action="append", default=[], metavar="FILE",
                   help="FLUX.2 Klein: a reference image (repeat for several); SD3.5: the init image for "
                        "image-to-image. The size defaults to the (first) image's. Needs a bundle with the encoder")
    g.add_argument("--strength", type=_finite, help="how much to redraw, in (0, 1]: SD3.5 image-to-image "
                                                    "(default 0.6), FLUX.2 Klein inpainting (default 0.8)")
    g.add_argument("--mask", type=Path, metavar="FILE",
                   help="FLUX.2 Klein inpainting: white repaints, black keeps; the first --image is inpainted (the "
                        "output takes its size), a second --image is a reference")
    g.add_argument("--lora", type=_lora_choice, action="append", default=[], metavar="NAME[:STRENGTH]",
                   help="a LoRA from the site library (edgegen lora list), strength 1 by default; repeat for "
                        "several. Needs a bundle exported with --runtime-lora")
    g.add_argument("--control", type=_control, action="append", default=[], metavar="NAME:IMAGE[:SCALE[:START:END]]",
                   help="SD3.5 ControlNet: condition on IMAGE with the bundle's ControlNet NAME at SCALE (default 1) "
                        "from START to END (fractions of the steps, default 0:1); repeat for several nets. The "
                        "image is stretched to the output size, then edge-detected (canny) or blurred (blur)")
    g.add_argument("--zero-negative", action="store_true",
                   help="SD3.5: CFG against zeroed negative embeddings, as ComfyUI's ConditioningZeroOut negative "
                        "(diffusers: negative_prompt_embeds of zeros), instead of the encoded --negative-prompt")
    g.add_argument("--control-as-is", action="store_true",
                   help="the --control images are already the nets' maps (edges, blurred, depth): no preprocessing")
    g.add_argument("--low-vram", action="store_true", default=None,
                   help="unload text encoders before denoising and the transformer before decoding "
                        "(default: when the plan says the components do not fit together)")

    pl = sub.add_parser("plan", help="what to build for a GPU")
    src = pl.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path)
    src.add_argument("--bundle", type=Path)
    pl.add_argument("--gpu", default="auto", help='auto, a name such as "RTX 4090", or smXY:GiB')
    pl.add_argument("--width", type=_size)
    pl.add_argument("--height", type=_size)
    pl.add_argument("--references", type=int, default=0, metavar="N",
                    help="FLUX.2 Klein input images per request, references and an inpainted image alike (their "
                         "tokens grow the transformer's memory)")
    pl.add_argument("--json", action="store_true")

    d = sub.add_parser("doctor", help="what works on this machine")
    d.add_argument("--bundle", type=Path, action="append", default=[])
    d.add_argument("--json", action="store_true")

    st = sub.add_parser("selftest", help="run the demo model through every backend here")
    st.add_argument("--model", type=Path, help="model folder (default: the demo model in assets/)")
    st.add_argument("--references", type=Path, help="reference PNGs + index.json (default: assets/demo-references)")
    st.add_argument("--bundle", type=Path, help="bundle to test (default: engines/demo, else a cached export)")

    a = sub.add_parser("app", help="the desktop app")
    a.add_argument("--bundle", type=Path)

    k = sub.add_parser("keys", help="signing keys for bundles")
    ksub = k.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    kg = ksub.add_parser("generate", help="create an Ed25519 signing key pair (NAME.key, NAME.pub)")
    kg.add_argument("--out", type=Path, required=True, help="folder for the key files")
    kg.add_argument("--name", help="signer name shown when the bundle loads (default: user@host)")

    s = sub.add_parser("sign", help="sign a bundle's manifest (writes manifest.sig)")
    s.add_argument("--bundle", type=Path, required=True)
    s.add_argument("--key", type=Path, required=True, help="private key from: edgegen keys generate")

    t = sub.add_parser("trust", help="trusted signing keys and the signed-bundle policy")
    tsub = t.add_subparsers(dest="trust_command", required=True, parser_class=_Parser)
    ta = tsub.add_parser("add", help="trust a public key (.pub)")
    ta.add_argument("pubkey", type=Path)
    ta.add_argument("--name", help="label for the key (default: the name in the file)")
    tl = tsub.add_parser("list", help="trusted keys and the policy")
    tl.add_argument("--json", action="store_true")
    tr = tsub.add_parser("remove", help="stop trusting a key")
    tr.add_argument("key_id")
    tp = tsub.add_parser("policy", help="show or set whether bundles must be signed by a trusted key")
    tp.add_argument("--require-signed", choices=["on", "off"])
    tp.add_argument("--require-signed-loras", choices=["on", "off"],
                    help="whether the LoRA library serves only LoRAs whose record a trusted key signed")
    lo = sub.add_parser("lora", help="the site LoRA library, for bundles exported with --runtime-lora")
    losub = lo.add_subparsers(dest="lora_command", required=True, parser_class=_Parser)
    ll = losub.add_parser("list", help="the library's LoRAs: name, family, rank, layers, signature")
    ll.add_argument("--json", action="store_true")
    la = losub.add_parser("add", help="check a .safetensors LoRA (diffusers, kohya or ComfyUI keys) and copy it in")
    la.add_argument("file", type=Path)
    la.add_argument("--name", help="the name requests use (default: the file name without .safetensors)")
    fam = la.add_mutually_exclusive_group()
    fam.add_argument("--family", choices=["flux2-klein", "sd3.5"], help="default: from the layer names")
    fam.add_argument("--bundle", type=Path, help="take the family from this bundle and check the shapes now")
    la.add_argument("--sign", type=Path, metavar="KEYFILE", help="sign the record with this private key")
    la.add_argument("--overwrite", action="store_true", help="replace a LoRA of the same name")
    lc = losub.add_parser("check", help="check a LoRA's file, signature and fit to a bundle, without generating")
    lc.add_argument("name")
    lc.add_argument("--bundle", type=Path)
    ls = losub.add_parser("sign", help="sign a LoRA's record (for a site that requires signed LoRAs)")
    ls.add_argument("name")
    ls.add_argument("--key", type=Path, required=True)
    lr = losub.add_parser("remove", help="remove a LoRA from the library")
    lr.add_argument("name")

    from app.server.commands import add_parsers as add_server_parsers  # serve, batch (issue 19)

    add_server_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from app import offline
    from app.progress import say

    offline.enforce_offline()
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except EdgegenError as e:
        message = str(e)
        if e.exit_code != 2:  # environment or runtime: the line also names a full report
            message = _with_report(message, e, argv)
        say(_one_line(f"edgegen: error: {message}"))
        return e.exit_code
    except KeyboardInterrupt:
        say("edgegen: interrupted")
        return 130
    except Exception as e:  # noqa: BLE001  the one place nothing may escape as a traceback
        say(_one_line(f"edgegen: error: {_with_report(_describe(e), e, argv)}"))
        return 1


def _one_line(text: str) -> str:
    """Messages go to the terminal as exactly one line, whatever bytes a path or prompt carried."""
    text = " ".join(text.splitlines())
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _with_report(message: str, exc: BaseException, argv) -> str:
    path = write_report(exc, list(sys.argv[1:] if argv is None else argv))
    return f"{message} (full report: {path})" if path else f"{message} (no report: the log folder is not writable)"


def _describe(exc: BaseException) -> str:
    """A sentence for a failure no check anticipated, naming the part that failed."""
    mod = type(exc).__module__ or ""
    if mod.startswith("onnxruntime"):
        return f"ONNX Runtime failed ({one_line(exc)}); run edgegen doctor, or re-export the bundle"
    if isinstance(exc, MemoryError):
        return "ran out of memory; close other programs, pick a smaller size, or use a machine with more RAM"
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return f"a file operation failed{where}: {exc.strerror or one_line(exc)}; check free space and permissions"
    tb = exc.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    if any(f.startswith(("app.runtime.engine", "app.runtime.trt_backend")) for f in frames):
        return f"the TensorRT backend failed ({one_line(exc)}); run edgegen doctor, or try --backend onnxruntime"
    return f"unexpected failure ({one_line(exc)}); this is a bug in edgegen, please send the report"


def entrypoint() -> None:
    sys.exit(main(sys.argv[1:]))


def cmd_export(args) -> int:
    from app.progress import say
    from export.exporter import ExportOptions, export_bundle

    sms = tuple(s.strip() for s in args.sm.split(",") if s.strip())
    opts = ExportOptions(
        model=args.model, out=args.out, family=args.family, precision=args.precision, target=args.target or "onnx",
        sms=sms,
        min_size=args.min_size, max_size=args.max_size, calibration_prompts=args.calibration_prompts,
        calibration_size=args.calibration_size, calibration_count=args.calibration_count,
        calibration_steps=args.calibration_steps,
        text_encoder_precision=args.text_encoder_precision,
        loras=tuple(args.lora), runtime_lora=args.runtime_lora, overwrite=args.overwrite, accept_low_fidelity=args.accept_low_fidelity,
        skip_memory_check=args.skip_memory_check, with_encoder=args.with_encoder, fp8_path=args.fp8_path,
        controlnets=tuple(args.controlnet),
    )
    if args.gpu:
        from app.planning.gpus import parse_gpu_option
        from export.exporter import options_for_gpu

        opts = options_for_gpu(opts, parse_gpu_option(args.gpu), explicit_target=args.target, say=say)
    if args.sign:  # check the key before a long export, not after it
        from app.bundle.trust import load_signing_key

        load_signing_key(args.sign)
    out = export_bundle(opts, progress=say)
    if args.sign:
        from app.bundle.trust import sign_bundle

        say(f"signature: {sign_bundle(out, args.sign).describe()}")
    print(out)
    return 0


def cmd_generate(args) -> int:
    from dataclasses import replace

    from app.progress import say, step_bar
    from app.runtime.generate import generate_files

    if args.count < 1:
        raise UsageError(f"--count {args.count} must be at least 1")
    paths = generate_files(
        bundle_dir=args.bundle, prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
        steps=args.steps, guidance=args.guidance, width=args.width, height=args.height, backend=args.backend,
        model=args.model, count=args.count, out=args.out, say=say, step_bar=step_bar, device=args.device,
        low_vram=args.low_vram, images=tuple(args.image), strength=args.strength, loras=tuple(args.lora),
        mask=args.mask, controls=tuple(replace(c, preprocess=not args.control_as_is) for c in args.control),
        zero_negative=args.zero_negative,
    )
    for p in paths:
        print(p)
    return 0


def cmd_plan(args) -> int:
    from rich.console import Console

    from app.planning.components import components_for
    from app.planning.gpus import parse_gpu_option
    from app.planning.plan import make_plan
    from app.planning.render import render_plan

    comps, family, defaults = components_for(model=args.model, bundle=args.bundle)
    gpu = parse_gpu_option(args.gpu)
    w, h = args.width or defaults["width"], args.height or defaults["height"]
    if not 0 <= args.references <= (family.max_images if family.name == "flux2-klein" else 0):
        raise UsageError(f"--references {args.references}: {family.name} takes 0 to "
                         f"{family.max_images if family.name == 'flux2-klein' else 0} reference images")
    from app.planning.components import reference_pixels

    source = None
    if args.bundle is not None:
        from app.bundle.manifest import load_bundle

        source = (load_bundle(args.bundle, verify=False).manifest.get("source") or {}).get("path")
    plan = make_plan(gpu, comps, w, h, batch=1, cfg=family.uses_negative_prompt,
                     reference_pixels=reference_pixels({}, args.references, w, h), source=source)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        Console(width=None if sys.stdout.isatty() else 160).print(render_plan(plan))  # no wrapped names in pipes
    return 0


def cmd_doctor(args) -> int:
    from app.site.doctor import doctor

    return doctor(args.bundle, as_json=args.json)


def cmd_selftest(args) -> int:
    from app.site.selftest import selftest

    return selftest(model_dir=args.model, references_dir=args.references, bundle_dir=args.bundle,
                    export=_selftest_export)


def _selftest_export(model: Path, out: Path, target: str | None, sms: tuple) -> None:
    """How the self-test writes its demo bundle when none is installed: the ordinary exporter."""
    from app.progress import say
    from export.exporter import ExportOptions, export_bundle

    opts = ExportOptions(model=model, out=out, overwrite=True, **({"target": target, "sms": sms} if target else {}))
    export_bundle(opts, progress=say)


def cmd_app(args) -> int:
    from app.ui.main import run_app

    return run_app(args.bundle)


def cmd_keys(args) -> int:
    from app.bundle.trust import generate_keypair
    from app.progress import say

    priv, pub = generate_keypair(args.out, args.name)
    say(f"private key {priv} (keep it secret; sign with: edgegen sign --bundle DIR --key {priv})")
    say(f"public key  {pub} (give it to users; they run: edgegen trust add {pub})")
    print(pub)
    return 0


def cmd_sign(args) -> int:
    from app.bundle.trust import sign_bundle

    state = sign_bundle(args.bundle, args.key)
    print(f"{args.bundle}: {state.describe()}")
    return 0


def cmd_lora(args) -> int:
    from app.bundle import loras as lib

    folder = lib.library_dir()
    if args.lora_command == "list":
        rows = []
        for rec in lib.list_records(folder):
            sig = rec.path.with_name(rec.name + lib.SIG_SUFFIX).exists()
            rows.append({"name": rec.name, "family": rec.family, "rank": rec.rank, "layers": len(rec.targets),
                         "layout": rec.layout, "sha256": rec.sha256, "bytes": rec.size, "signed": sig,
                         "path": str(rec.path)})
        if args.json:
            print(json.dumps({"library": str(folder), "loras": rows}, indent=2))
            return 0
        print(f"library: {folder}")
        for r in rows:
            print(f"{r['name']}  {r['family']}  rank {r['rank']}  {r['layers']} layers  {r['layout']}  "
                  f"{'signed' if r['signed'] else 'unsigned'}  {r['sha256'][:12]}")
        if not rows:
            print("no LoRAs (add one with: edgegen lora add FILE)")
        return 0
    if args.lora_command == "add":
        from app.runtime.loras import add_to_library

        bundle = None
        if args.bundle is not None:
            from app.bundle.manifest import load_bundle

            bundle = load_bundle(args.bundle, verify=False)  # the manifest's slots; nothing is run
        if args.sign is not None:
            from app.bundle.trust import _load_private

            _load_private(args.sign)  # a bad key is refused before the LoRA is read
        rec = add_to_library(args.file, args.name, args.family, bundle, folder, args.overwrite)
        print(f"added {rec.name}: {rec.family}, rank {rec.rank}, {len(rec.targets)} layers, {rec.layout} keys, "
              f"sha256 {rec.sha256[:12]} ({rec.path})")
        if args.sign is not None:
            print(f"signature: {lib.sign_record(rec.name, args.sign, folder).describe()}")
        return 0
    if args.lora_command == "sign":
        print(f"{args.name}: {lib.sign_record(args.name, args.key, folder).describe()}")
        return 0
    if args.lora_command == "remove":
        rec = lib.find_record(args.name, folder)
        for p in (rec.record_path, rec.path.with_name(rec.name + lib.SIG_SUFFIX), rec.path):
            p.unlink(missing_ok=True)
        print(f"removed {rec.name}")
        return 0
    rec = lib.find_record(args.name, folder)
    state = lib.verify_record(rec)
    if args.bundle is not None:
        from app.bundle.manifest import load_bundle
        from app.runtime.loras import bundle_lora

        b = load_bundle(args.bundle, verify=False)
        lora = bundle_lora(b.manifest)
        lib.check_against(rec, b.manifest["family"], lora and lora["slots"], lora and lora["max_rank"],
                          f"bundle {args.bundle}")
    print(f"{rec.name}: sha256 matches; {state.describe() if state.signed else 'unsigned'}"
          + (f"; fits {args.bundle}" if args.bundle is not None else ""))
    return 0


def cmd_trust(args) -> int:
    from app.bundle import trust

    if args.trust_command == "add":
        k = trust.add_trusted_key(args.pubkey, args.name)
        print(f"trusted {k.key_id} {k.name}")
    elif args.trust_command == "remove":
        k = trust.remove_trusted_key(args.key_id)
        print(f"removed {k.key_id} {k.name}")
    elif args.trust_command == "list":
        trust.load_policy()  # a damaged policy file is an error here too, never shown as "off"
        report = trust.trust_report()
        if args.json:
            print(json.dumps(report, indent=2))
            return 0
        pol = report["policy"]
        print(f"require signed bundles: {'on' if pol['require_signed_bundles'] else 'off'}"
              + (f" ({', '.join(pol['sources'])})" if pol.get("sources") else ""))
        for k in report["trusted_keys"]:
            print(f"{k['key_id']}  {k['scope']:4}  {k['name']}")
        if not report["trusted_keys"]:
            print("no trusted keys (add one with: edgegen trust add PUBKEY)")
        for problem in report["problems"]:
            print(f"skipped: {problem}")
        if not report["cryptography"]:
            print(f"signatures cannot be checked: cryptography is not installed ({trust.INSTALL_HINT})")
    else:
        if args.require_signed is not None:
            trust.set_require_signed(args.require_signed == "on")
        if args.require_signed_loras is not None:
            trust.set_require_signed(args.require_signed_loras == "on", trust.LORA_POLICY_KEY)
        for what, pol in (("bundles", trust.load_policy()), ("LoRAs", trust.load_lora_policy())):
            print(f"require signed {what}: {'on' if pol.require_signed_bundles else 'off'}"
                  + (f" ({', '.join(pol.sources)})" if pol.sources else ""))
    return 0


COMMANDS = {"lora": cmd_lora, "keys": cmd_keys, "sign": cmd_sign, "trust": cmd_trust, "export": cmd_export, "generate": cmd_generate, "plan": cmd_plan, "doctor": cmd_doctor,
            "selftest": cmd_selftest, "app": cmd_app}



def cmd_serve(args) -> int:
    from app.server.commands import cmd_serve as serve

    cluster = None
    if args.cluster:  # the cluster is handed to the server here; app.server never imports app.cluster
        from app.cluster import serve as cluster
    return serve(args, cluster=cluster)


def cmd_batch(args) -> int:
    from app.server.commands import cmd_batch as batch

    return batch(args)


COMMANDS.update(serve=cmd_serve, batch=cmd_batch)

if __name__ == "__main__":
    entrypoint()
