"""The results page (docs/RESULTS.md and the README's table) is what the committed records give, reads as today's
results, and names a command and a CPU on every row; tools/results_page.py renders it.

    python -m pytest -q tests/test_docs.py
"""

from __future__ import annotations

import copy
import json
import re

import pytest

from tools import results_page as rp

CPU = "Test CPU (no bf16)"


def table_rows(text: str) -> list[str]:
    """The body rows of every markdown table in `text` (header and separator lines left out)."""
    lines = text.splitlines()
    return [line for i, line in enumerate(lines) if line.startswith("|") and not line.startswith("| ---")
            and not (i + 1 < len(lines) and lines[i + 1].startswith("| ---"))]


def readme_block(text: str) -> str:
    return text.split(rp.BEGIN)[1].split(rp.END)[0]


def assert_rows_cite(text: str) -> None:
    rows = table_rows(text)
    assert rows
    for row in rows:
        assert "`python " in row, row
        cpu = row.rstrip(" |").rsplit("|", 1)[1].strip()
        assert cpu != "-" or "not measured yet" in row, row


def eval_model(name: str, kl: float, **extra) -> dict:
    tasks = {t: {"acc": 0.4, "acc_stderr": 0.05, "acc_norm": 0.45, "acc_norm_stderr": 0.05, "n": 24,
                 "average_metric": "acc_norm"} for t in rp.TASKS}
    return {"name": name, "kl_to_teacher": kl, "top1_agreement": 1 - kl / 10, "ppl": {"chat": 6 + kl, "text": 20 + kl},
            "tasks": tasks, "average": 0.45, "kv_bytes_per_token": 11520, **extra}


def fake_result(name: str) -> dict:
    """A result of the shape each record's last command writes."""
    settings = {"fidelity_tokens": {"chat": 8192, "text": 8192}, "limit": "mmlu=96,*=24"}
    if name == "decode":
        rows = [{"kind": "decode", "status": "ok", "run": run, "batch": b, "context": c, "tokens_per_s": 10.0,
                 **({"speedup_vs_gqa-static": 1.5, "speedup_vs_gqa-static_range": [1.4, 1.6],
                     "speedup_vs_gqa-dynamic": 3.0, "speedup_vs_gqa-dynamic_range": [2.9, 3.1]}
                    if run == "absorbed" else {})}
                for run in ("absorbed", "gqa-static", "gqa-dynamic") for b in (8, 16) for c in (4096, 8192)]
        return {"rows": rows}
    if name == "latent-decode":
        return {"rows": [{"kind": "decode", "status": "ok", "run": run, "batch": 8, "context": 4096, "tokens_per_s": tps}
                         for run, tps in (("absorbed-16bit", 10.0), ("absorbed-int8", 10.5), ("absorbed-int4", 11.0),
                                          ("gqa-static", 5.0))]}
    if name == "kv-quant":
        rows = [{"spec": spec, "bf16": {"bytes_per_token": 46080 / x},
                 "chat": {"kl": kl, "tokens": 2400}, "text": {"kl": kl * 0.8, "tokens": 4088}}
                for spec, x, kl in zip(rp.GQA_CACHES, (3.3, 5.5, 2.8, 6.4, 9.0), (0.02, 2.0, 0.01, 0.9, 3.0))]
        return {"bf16_bytes_per_token": 46080, "context": 4096, "rows": rows}
    if name == "frontier":
        rows = [{"student": s, "cache_bits": b, "kd_tokens": 46080 * s.endswith("kd"),
                 "bytes_per_token": 46080 / x * (16 / b) ** 0.3, "chat": {"kl": kl, "tokens": 2400},
                 "text": {"kl": kl, "tokens": 4088}}
                for s, x, kl in (("2x", 2, 0.5), ("4x", 4, 1.2), ("8x", 8, 2.0)) for b in (16, 8, 4)]
        rows += [{"student": f"{s}-int4-kd", "cache_bits": 4, "kd_tokens": 46080, "bytes_per_token": 46080 / x,
                  "chat": {"kl": kl, "tokens": 2400}, "text": {"kl": kl, "tokens": 4088}}
                 for s, x, kl in (("4x", 7.4, 0.8), ("8x", 10.1, 1.4))]
        return {"bf16_gqa_bytes_per_token": 46080, "context": 4096, "rows": rows}
    if name == "fit-ablation":
        return [{"variant": v, "init": "fitted", "changes": ch, "kl": kl, "top1": 0.4, "ppl_chat": 30.0, "tokens": 3234}
                for v, ch, kl in (("default", {}, 1.7), ("no-o-refit", {"o_target": "none"}, 2.0))]
    if name.startswith("demo-"):
        models = [eval_model("teacher", 0.0), eval_model("student-0tok", 1.2, tokens_trained=0),
                  eval_model("student-kd", 0.8, tokens_trained=46080)]
        return {"models": models, "settings": settings,
                "demo": {"stage_minutes": {"assets": 1.0, "convert": 6.5, "distill": 12.0, "eval": 8.0}}}
    names = {"teacher": ["teacher"], "inits-4x": ["teacher", *rp.OTHER_INITS], "export": ["export"]}.get(name) \
        or ["teacher", f"{name.split('-')[1]}-fitted"]
    return {"models": [eval_model(n, 0.0 if n == "teacher" else 1.0) for n in names], "settings": settings}


def full_records() -> dict:
    return {name: {"command": spec.command, "cpu": CPU, "commit": "abc1234", "date": "2026-12-01",
                   "result": fake_result(name)} for name, spec in rp.RECORDS.items()}


def test_committed_pages_are_what_the_records_give():
    assert rp.main(["--check"]) == 0


def test_check_fails_when_the_page_differs(tmp_path, monkeypatch):
    page = tmp_path / "RESULTS.md"
    page.write_text(rp.PAGE.read_text() + "an edit by hand\n")
    monkeypatch.setattr(rp, "PAGE", page)
    assert rp.main(["--check"]) == 1


def test_results_page_reads_as_today():
    text = rp.PAGE.read_text()
    assert len(text.splitlines()) <= 250
    assert not re.search(r"\b(sessions?|issues?)\b", text, re.I)
    assert "runs/" not in text


def test_every_row_names_a_command_and_a_cpu():
    assert_rows_cite(rp.PAGE.read_text())
    assert_rows_cite(readme_block(rp.README.read_text()))


def test_fully_measured_page_stays_short_and_cited():
    """Once every record exists (the lead reruns the rest), the page still fits and every row still cites."""
    recs = full_records()
    text = rp.render(recs)
    assert len(text.splitlines()) <= 250
    assert "not measured yet" not in text
    assert_rows_cite(text)
    assert_rows_cite(readme_block(rp.render_readme(recs, rp.README.read_text())))
    assert CPU in text and "abc1234" in text


def test_a_record_of_other_commands_renders_as_not_measured(tmp_path):
    recs = full_records()
    for name, rec in recs.items():
        rec = copy.deepcopy(rec)
        if name == "zero-4x":
            rec["command"] = rec["command"].replace("--kv-rank 64", "--kv-rank 65")
        (tmp_path / f"{name}.json").write_text(json.dumps(rec))
    loaded = rp.load_records(tmp_path)
    assert loaded["zero-4x"] is None and loaded["zero-2x"] is not None
    assert "not measured yet: `python tools/results_page.py --rerun zero-4x`" in rp.render(loaded)


def test_rerun_refuses_a_used_out_folder_and_runs_nothing(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(rp.subprocess, "run", lambda *a, **k: ran.append(a))
    (tmp_path / "out" / "teacher").mkdir(parents=True)
    with pytest.raises(SystemExit, match="out/teacher exists"):
        rp.rerun(["zero-2x", "teacher"], tmp_path)
    assert ran == []


def test_an_exact_export_of_a_broken_model_is_called_broken():
    recs = full_records()
    assert "broken" not in rp.render(recs)
    model_row = recs["export"]["result"]["models"][0]
    model_row["ppl"]["chat"] = 11 * recs["teacher"]["result"]["models"][0]["ppl"]["chat"]
    assert "**The model exported here is broken**" in rp.render(recs)


def test_a_record_names_the_code_its_command_started_on(tmp_path, monkeypatch):
    """The tree may be edited (or committed) while a long measurement runs: the record keeps the commit it began on."""
    import sys

    from tools import record

    said = iter(["abc1234", "def5678-dirty"])
    monkeypatch.setattr(record, "commit", lambda: next(said))
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-c", f"open({str(out)!r}, 'w').write('{{\"x\": 1}}')"]
    assert record.main([str(tmp_path / "rec.json"), "--result", str(out), "--", *cmd]) == 0
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["commit"] == "abc1234" and rec["result"] == {"x": 1}
