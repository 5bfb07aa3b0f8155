"""`ecomla plan`: the memory of one distill KD step per device, from configs built on the meta device."""

from .run import PlanArgs, plan_run, run_plan

__all__ = ["PlanArgs", "plan_run", "run_plan"]
