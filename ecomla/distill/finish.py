"""End of a stage-1 run: the final HF checkpoint in OUT/ and a held-out KL / perplexity check."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def save_final(trainer) -> None:
    """Write the student as a loadable HF folder into OUT (files staged, then renamed into place)."""
    acc, out = trainer.acc, trainer.out
    student = acc.unwrap_model(trainer.model).student
    state = acc.get_state_dict(trainer.model)
    if not acc.is_main_process:
        return
    stage = out / ".final.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    student.save_pretrained(stage, state_dict={k.removeprefix("student."): v for k, v in state.items()})
    trainer.tok.save_pretrained(stage)
    src_meta = Path(trainer.student_path) / "ecomla_convert.json"
    if src_meta.is_file():
        shutil.copy(src_meta, stage / "ecomla_convert.json")
    # the weights land before config.json, so a reader never sees a config without its weights
    names = sorted(os.listdir(stage), key=lambda n: n == "config.json")
    for name in names:
        os.replace(stage / name, out / name)
    stage.rmdir()


def heldout_check(trainer) -> dict | None:
    from ..data.packing import PackedChat
    from ..eval.fidelity import fidelity

    a = trainer.args
    if a.eval_tokens <= 0 or trainer.teacher is None or not trainer.acc.is_main_process:
        return None
    student = trainer.acc.unwrap_model(trainer.model).student.eval()
    batches = PackedChat(trainer.split["heldout"], trainer.tok, a.seq_len, seed=0).take_tokens(a.eval_tokens,
                                                                                                a.batch_size)
    with trainer.acc.autocast():
        res = fidelity({"student": student}, trainer.teacher, batches, desc="held-out check")
    return {"kl_to_teacher": res["student"]["kl"], "top1_agreement": res["student"]["top1_agreement"],
            "ppl_chat": res["student"]["ppl"], "teacher_ppl_chat": res["teacher"]["ppl"], "tokens": res["student"]["tokens"]}


def finish(trainer, stopped: str, elapsed: float) -> dict:
    acc = trainer.acc
    save_final(trainer)
    acc.wait_for_everyone()
    check = heldout_check(trainer)
    summary = {"stopped": stopped, "steps": trainer.step, "tokens": trainer.step * trainer.tokens_per_step,
               "ild_steps": trainer.ild_steps, "kd_steps": trainer.kd_steps, "minutes": round(elapsed / 60, 2),
               "teacher": trainer.teacher_spec, "heldout": check, "world_size": trainer.world}
    if acc.is_main_process:
        trainer.log({"final": summary})
        (trainer.out / "ecomla_train.json").write_text(json.dumps(
            {"args": {k: getattr(trainer.args, k) for k in trainer.args.__dataclass_fields__}, **summary}, indent=2))
        print(f"distill: {stopped} after {trainer.step} steps ({summary['tokens']:,} tokens, {summary['minutes']} min);"
              f" held-out: {check}")
    return summary
