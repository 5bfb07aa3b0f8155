"""`accelerate launch --config_file FSDP.yaml tests/fsdp_cpu.py distill ...` with ACCELERATE_USE_CPU=1: ecomla's
command line under FSDP2 on CPU processes (gloo). For tests only (tests/test_sharded.py).

accelerate 1.16 keeps FSDP for GPU-type devices: on CPU processes it sets MULTI_CPU and drops the FSDP plugin
(ecomla distill then refuses the run: distill/sharding.py). torch's FSDP2 itself shards on CPU with gloo, so this
launcher sets accelerate's state to FSDP, with the plugin the config built, after accelerate chose MULTI_CPU. From
there on the code is the one a GPU run executes: accelerate's fully_shard wrapping, its sharded save_state and
load_state, the gathered state dict, ecomla's trainer (or TRL's, for `dpo`). ECOMLA_TEST_KILL_AT=N: the main
process kills itself (SIGKILL) as step N starts, as a crashed machine would.
"""

import os
import signal
import sys
from pathlib import Path

import yaml

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]

_init = AcceleratorState.__init__


def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


def killed_at(step: int, command: str):
    if command == "dpo":  # transformers' Trainer: `global_step` steps are done as step global_step + 1 starts
        from transformers import Trainer

        training_step = Trainer.training_step

        def wrapped(self, *args, **kwargs):
            if self.state.global_step == step - 1 and self.is_world_process_zero():
                os.kill(os.getpid(), signal.SIGKILL)
            return training_step(self, *args, **kwargs)
        Trainer.training_step = wrapped
        return
    from ecomla.distill.trainer import Trainer

    train_step = Trainer._train_step

    def wrapped(self):
        if self.step == step and self.acc.is_main_process:
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(self)
    Trainer._train_step = wrapped


def fsdp_config(folder: Path, processes: int = 2, mixed_precision: str = "no") -> Path:
    """recipes/accelerate/fsdp-8gpu.yaml on `processes` processes at `mixed_precision`, written into FOLDER: the
    config the tests and benchmarks/plan_memory.py launch with."""
    config = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp-8gpu.yaml").read_text())
    config.update(num_processes=processes, mixed_precision=mixed_precision)
    path = Path(folder) / "fsdp2.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def allow_fsdp_on_cpu() -> None:
    """From here on in this process, accelerate keeps the FSDP its config asks for on CPU processes (see above)."""
    AcceleratorState.__init__ = fsdp_on_cpu


if __name__ == "__main__":
    allow_fsdp_on_cpu()
    if os.environ.get("ECOMLA_TEST_KILL_AT"):
        killed_at(int(os.environ["ECOMLA_TEST_KILL_AT"]), sys.argv[1])
    from ecomla.cli import main

    sys.exit(main(sys.argv[1:]))
