"""`edgegen batch` over a CSV catalogue (in-process and against a server, resumable) and the serve/batch CLI."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import requests
from test_server_helpers import DOCS, server_config, start_server

pytest.importorskip("aiohttp")


def _results(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_catalogue_runs_in_process_then_resumes_against_a_server(demo_bundle, tmp_path):
    from app.errors import UsageError
    from app.server.batch import run_batch

    rows = tmp_path / "catalogue.csv"
    shutil.copy(DOCS / "catalogue.csv", rows)
    workflow = DOCS / "catalogue_workflow.json"
    cfg = server_config(tmp_path / "srv", demo_bundle)
    res = run_batch(rows, workflow, concurrency=2, local_config=cfg, say=lambda m: None, show_progress=False)
    assert (res.done, res.failed, res.skipped) == (4, 0, 0)
    results = _results(tmp_path / "catalogue.results.csv")
    assert [r["row"] for r in results] == ["1", "2", "3", "4"] and {r["status"] for r in results} == {"success"}
    for r, sku in zip(results, ("SKU-001", "SKU-002", "SKU-003", "SKU-004")):
        assert r["images"].startswith(f"catalogue/{sku}_")
        assert (tmp_path / "srv" / "output" / r["images"]).is_file()

    with pytest.raises(UsageError, match="--resume"):
        run_batch(rows, workflow, local_config=cfg, say=lambda m: None, show_progress=False)

    with start_server(tmp_path / "srv", demo_bundle) as s:  # the same queue: its history already holds 4 jobs
        before = len(requests.get(f"{s.url}/history", timeout=30).json())
        again = run_batch(rows, workflow, server=s.url, resume=True, say=lambda m: None, show_progress=False)
        assert (again.done, again.skipped) == (0, 4)
        kept = [r for r in results if r["row"] in ("1", "3")]  # as if the run had stopped after two rows
        with open(tmp_path / "catalogue.results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(results[0]))
            w.writeheader()
            w.writerows(kept)
        rest = run_batch(rows, workflow, server=s.url, resume=True, concurrency=3, say=lambda m: None,
                         show_progress=False)
        assert (rest.done, rest.failed, rest.skipped) == (2, 0, 2)
        assert len(requests.get(f"{s.url}/history", timeout=30).json()) == before + 2
    assert {r["row"]: r["status"] for r in _results(tmp_path / "catalogue.results.csv")} == {
        "1": "success", "2": "success", "3": "success", "4": "success"}


def test_batch_rows_fill_placeholders_and_node_inputs():
    import json

    from app.errors import UsageError
    from app.server.batch import fill

    graph = json.loads((DOCS / "catalogue_workflow.json").read_text())
    row = {"sku": "A1", "shape": "square", "colour": "red", "background": "white", "seed": "5", "3.steps": "2"}
    g = fill(graph, row)
    assert g["6"]["inputs"]["text"] == "a red square on a white background"
    assert g["3"]["inputs"]["seed"] == 5 and g["3"]["inputs"]["steps"] == 2
    assert g["9"]["inputs"]["filename_prefix"] == "catalogue/A1"
    assert graph["3"]["inputs"]["seed"] == "{seed}"  # the workflow itself is untouched
    with pytest.raises(UsageError, match=r"\{colour\}"):
        fill(graph, {k: v for k, v in row.items() if k != "colour"})
    brand = fill(json.loads((DOCS / "catalogue_brand_workflow.json").read_text()),
                 {"bundle": "b", "product": "a bag", "seed": "1", "width": "1024", "height": "768",
                  "style_reference": "style.png", "sku": "BAG"})
    assert brand["1"]["inputs"]["images"] == ["style.png"] and brand["1"]["inputs"]["width"] == 1024


def test_failed_rows_are_reported_and_exit_1(demo_bundle, tmp_path, capsys):
    from app.cli import main

    rows = tmp_path / "rows.csv"
    rows.write_text("sku,shape,colour,background,seed\nOK,circle,red,blue,1\nBAD,circle,red,blue,-5\n")
    with start_server(tmp_path / "srv", demo_bundle) as s:
        rc = main(["batch", str(rows), "--workflow", str(DOCS / "catalogue_workflow.json"), "--server", s.url])
    assert rc == 1
    res = {r["row"]: r for r in _results(tmp_path / "rows.results.csv")}
    assert res["1"]["status"] == "success" and res["2"]["status"] == "error" and "seed" in res["2"]["error"]
    assert "1 rows failed" in capsys.readouterr().err


def test_serve_refuses_other_addresses_without_a_token_and_cluster_for_now(tmp_path, capsys):
    from app.cli import main

    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--token-file" in err
    short = tmp_path / "short"
    short.write_text("abc\n")
    assert main(["serve", "--host", "192.168.1.20", "--token-file", str(short)]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert main(["serve", "--cluster", "10.0.0.1:6379"]) == 2
    assert "--cluster-token-file" in capsys.readouterr().err  # a cluster beyond loopback needs Ray token auth
    assert main(["serve", "--port", "99999"]) == 2
    assert main(["batch", str(tmp_path / "none.csv"), "--workflow", str(DOCS / "text_to_image.json"),
                 "--concurrency", "0"]) == 2
