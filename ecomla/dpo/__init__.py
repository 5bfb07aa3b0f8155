"""Stage 2: DPO on the distilled student with TRL's DPOTrainer; the reference is a frozen copy of the student.

    ecomla dpo runs/kd-4x --make-pairs --out runs/dpo-4x --max-minutes 10      # offline CPU default
    ecomla dpo runs/kd-4x --config recipes/dpo-gpu-llama-3.2-1b.yaml           # the paper's preference sets

Modules: `run` (arguments, the whole stage as `run_dpo`), `data` (preference data in TRL's layout),
`pairs` (teacher-vs-student pairs from ShareGPT train prompts), `trainer` (TRL wiring, budgets, resume).
"""
