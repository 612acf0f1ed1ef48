"""The docs say only what the code does (issue 29): claims about refused or missing features are checked
against the code they describe, so a feature that lands cannot leave a stale "refused" behind."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Phrases that promise a later change; each such claim went stale once already (docs/api/README.md said
# reference images were refused "until the runtime supports them" after they had landed).
STALE = re.compile(r"until the runtime supports|not yet supported by the runtime|refused until", re.I)


def test_no_doc_promises_a_feature_the_code_already_has():
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in DOCS
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if STALE.search(line)]
    assert not hits, "\n".join(hits)


def test_the_api_doc_names_every_node_the_server_accepts_and_no_other():
    from app.server.graph import SUPPORTED

    text = (ROOT / "docs" / "api" / "README.md").read_text(encoding="utf-8")
    for node in SUPPORTED:
        assert f"`{node}`" in text, f"docs/api/README.md does not mention {node}"


def test_every_cli_command_and_flag_in_the_lora_doc_exists():
    from app.cli import build_parser

    text = (ROOT / "docs" / "LORA.md").read_text(encoding="utf-8")
    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    claims = []  # (command, flag) for every flag after "edgegen COMMAND" on its line, up to the next command
    for line in text.splitlines():
        for part in line.split("edgegen ")[1:]:
            cmd = re.match(r"\w+", part)
            if cmd and not cmd.group(0)[0].isupper():
                claims += [(cmd.group(0), f) for f in re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", part)]
    assert len(claims) >= 15, claims
    for cmd, flag in claims:
        assert cmd in subs, cmd
        flags = {o for a in subs[cmd]._actions for o in a.option_strings}
        nested = [a for a in subs[cmd]._actions if a.__class__.__name__ == "_SubParsersAction"]
        for n in nested:
            for p in n.choices.values():
                flags |= {o for a in p._actions for o in a.option_strings}
        assert flag in flags, f"docs/LORA.md: edgegen {cmd} has no {flag}"
