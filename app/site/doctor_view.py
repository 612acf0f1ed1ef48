"""Print a `doctor` report (from app.site.doctor.gather) as rich tables; long fixes go on lines of their own."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _table(*columns: str) -> Table:
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def _or(value, missing: str = "not installed") -> str:
    return missing if value is None else str(value)


def _gpus(c: Console, r: dict) -> None:
    c.print("\n[bold]GPU[/]")
    if not r["gpus"]:
        c.print(f"  {r['gpu_note']}")
        return
    t = _table("#", "name", "SM", "VRAM free / total", "driver")
    for g in r["gpus"]:
        vram = ("unified memory" if g["vram_total_gib"] is None
                else f"{g['vram_free_gib']} / {g['vram_total_gib']} GiB")
        t.add_row(str(g["index"]), g["name"], f"sm{g['sm']}", vram, g["driver"])
    c.print(t)


def _software(c: Console, r: dict) -> None:
    sw = r["software"]
    tor, ort = sw["torch"], sw["onnxruntime"]
    t = _table("component", "version", "notes")
    t.add_row("Python", sw["python"], r["python"])
    t.add_row("PyTorch", _or(tor["version"]), tor.get("error", "") if tor["version"] is None else
              ("CUDA device available" if tor["cuda_available"] else "no CUDA device in use"))
    t.add_row("CUDA (PyTorch build)", _or(tor["cuda"], "none (CPU build)"), "")
    t.add_row("ONNX Runtime", _or(ort["version"]), ", ".join(ort["providers"]) or ort.get("error", ""))
    t.add_row("TensorRT", _or(sw["tensorrt"]), "")
    t.add_row("TensorRT-RTX", _or(sw["tensorrt_rtx"]), "")
    for name, version in sw["packages"].items():
        t.add_row(name, _or(version), "")
    c.print("\n[bold]Software[/]")
    c.print(t)


def _bundles(c: Console, r: dict) -> None:
    c.print("\n[bold]Bundles[/]")
    if not r["bundles"]:
        c.print(f"  none found (searched: {', '.join(r['bundles_searched']) or 'no engines/ folder'})")
        return
    t = _table("bundle", "verified", "model", "runs here on")
    for e in r["bundles"]:
        if e["ok"]:
            t.add_row(escape(e["path"]), "[green]yes[/]", escape(f"{e['model']} ({e['family']}, {e['precision']})"),
                      _or(e.get("backend"), "nothing"))
        else:
            t.add_row(escape(e["path"]), "[red]NO[/]", "", "")
    c.print(t)
    for e in r["bundles"]:
        if not e["ok"]:
            c.print(f"  {e['path']}: {e['error']}", markup=False, soft_wrap=True)
            continue
        c.print(f"  {e['path']}: {e.get('backend_reason', '')}", markup=False, soft_wrap=True)
        for eng in e.get("engines", []):
            state = "usable" if eng["usable"] else f"not usable: {eng['why']}"
            c.print(f"    engine {eng['component']} {eng['target']} {eng['version']} sm{eng['sm']}: {state}",
                    markup=False, soft_wrap=True)
            if eng.get("fix"):
                c.print(f"      fix: {eng['fix']}", markup=False, soft_wrap=True)
        if e.get("engine_hint"):
            c.print(f"    {e['engine_hint']}", markup=False, soft_wrap=True)
        mem = e.get("memory")
        if mem and "error" not in mem:
            c.print(f"    memory at {mem['size']}: peak {mem['peak_gib']} of {mem['usable_gib']} GiB usable — "
                    f"{mem['does']}" + ("" if mem["strategy"] not in ("does-not-fit", "cannot-run") else f" ({' '.join(mem['notes'])})"),
                    markup=False, soft_wrap=True)


def _signing(c: Console, s: dict) -> None:
    c.print("\n[bold]Signing[/]")
    if not s.get("available"):
        c.print(f"  {s.get('reason', 'not available')}", markup=False, soft_wrap=True)
        return
    pol = s.get("policy", {})
    if pol.get("error"):
        c.print(f"  policy: {pol['error']}", markup=False, soft_wrap=True)
    else:
        why = f" ({', '.join(pol.get('sources', []))})" if pol.get("sources") else ""
        c.print(f"  signed bundles required: {'yes' if pol.get('require_signed_bundles') else 'no'}{why}",
                markup=False, soft_wrap=True)
    keys = s.get("trusted_keys", [])
    c.print(f"  trusted keys: {len(keys)}" + ("" if s.get("cryptography", True) else
                                              " (cryptography not installed: signatures cannot be checked)"))
    for k in keys:
        c.print(f"    {k['key_id']} {k['name']} ({k['scope']})", markup=False)
    for b in s.get("bundles", []):
        state = b.get("summary") or b.get("error") or b.get("unavailable", "")
        c.print(f"  {b['path']}: {state}", markup=False, soft_wrap=True)


def render(r: dict, console: Console | None = None) -> None:
    c = console or Console(highlight=False, soft_wrap=False)
    c.print(f"[bold]edgegen {r['edgegen']} doctor[/] — {r['platform']}")
    _gpus(c, r)
    _software(c, r)
    _bundles(c, r)
    c.print("\n[bold]Storage[/]")
    for d in r["disk"]:
        c.print(f"  {d['free_gib']} GiB free of {d['total_gib']} GiB at {d['path']}", markup=False)
    c.print("\n[bold]Offline[/]")
    c.print(f"  {r['offline']['summary']}", markup=False, soft_wrap=True)
    c.print(f"  audit log: {r['audit_log']}", markup=False, soft_wrap=True)
    _signing(c, r["signing"])
    c.print()
    for w in r["warnings"]:
        c.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)
    for p in r["problems"]:
        c.print(f"[red]problem:[/] {escape(p)}", soft_wrap=True)
    if r["ready"]:
        c.print("[green bold]READY[/]: images can be generated here")
    else:
        c.print(f"[red bold]NOT READY[/]: {len(r['problems'])} problem(s) above prevent generation")
