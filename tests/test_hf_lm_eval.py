"""lm-evaluation-harness on an export (docs/hf_eval.md, 'lm-evaluation-harness'): the `lm_eval --model hf` command
line, run offline on the tiny local tasks of tests/lm_eval_tasks/ssa_tiny, loads a gated export through its remote
code and takes the SSA mode and budget from --model_args (which lm-eval forwards to from_pretrained, which sets
them on the config) or, without them, from config.json."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers.hf import gated_export, write_corpus, write_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TASKS = "ssa_tiny_ppl,ssa_tiny_mc"

# One process: the command line once (the documented command), then the same evaluation through the Python API
# (simple_evaluate with the same model_args string) for the other settings, with a task index of the local tasks
# only: indexing lm-eval's ~10k built-in task files takes about 9 s per command line run here. The export's remote
# code must never import ssa_megatron.
_CHILD = textwrap.dedent("""
    import json, sys
    from lm_eval import simple_evaluate
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.tasks import TaskManager
    cli_argv, api_runs, tasks, include, out = json.loads(sys.argv[1])
    sys.argv = ["lm_eval", *cli_argv]
    cli_evaluate()
    manager = TaskManager(include_path=include, include_defaults=False)
    for name, model_args in api_runs.items():
        res = simple_evaluate(model="hf", model_args=model_args, tasks=tasks.split(","), task_manager=manager,
                              device="cpu", batch_size=4)
        with open(f"{out}/{name}.json", "w") as f:
            json.dump({"results": res["results"]}, f, default=float)
    print("SSA_MEGATRON_IMPORTED", any(m.split(".")[0] == "ssa_megatron" for m in sys.modules))
""")


def _results(folder: Path) -> dict:
    (found,) = folder.rglob("results_*.json")
    return json.loads(found.read_text())["results"]


@pytest.mark.slow
def test_lm_eval_cli_full_and_sparse(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # lm-eval's hf model needs it (the eval extra installs it)
    tok = write_tokenizer(write_corpus(tmp_path / "corpus.txt"), tmp_path / "tok").parent
    model = gated_export(tmp_path / "model", tok)  # config.json: ssa_mode sparse, ssa_top_k 2, blocks of 16
    base = f"pretrained={model},trust_remote_code=True"
    runs = {
        "config": base,                                     # mode and budget from config.json
        "sparse": f"{base},ssa_mode=sparse,ssa_top_k=2",
        "full": f"{base},ssa_mode=full",
        "covering": f"{base},ssa_top_k=16",                 # 16 x 16 tokens >= every request (max length 256)
    }
    out = tmp_path / "results"
    out.mkdir()
    cli = ["--model", "hf", "--model_args", runs.pop("sparse"), "--tasks", TASKS, "--include_path",
           "tests/lm_eval_tasks", "--device", "cpu", "--batch_size", "4", "--output_path", str(out / "cli")]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "TOKENIZERS_PARALLELISM": "false"}
    child = [cli, runs, TASKS, str(ROOT / "tests" / "lm_eval_tasks"), str(out)]
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(child)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SSA_MEGATRON_IMPORTED False" in proc.stdout

    results = {name: json.loads((out / f"{name}.json").read_text())["results"] for name in runs}
    results["sparse"] = _results(out / "cli")
    for name, res in results.items():
        ppl, mc = res["ssa_tiny_ppl"], res["ssa_tiny_mc"]
        for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
            assert isinstance(ppl[key], float) and math.isfinite(ppl[key]) and ppl[key] > 0, (name, key, ppl)
        assert 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= mc["acc_norm,none"] <= 1.0, (name, mc)

    def word_ppl(name):
        return results[name]["ssa_tiny_ppl"]["word_perplexity,none"]

    # The documents are longer than the 2-block budget: sparse attention really differs from full ...
    assert abs(word_ppl("sparse") / word_ppl("full") - 1) > 1e-3
    # ... a budget covering every request is full attention (docs/ssa.md), so the budget really took effect ...
    assert word_ppl("covering") == pytest.approx(word_ppl("full"), rel=1e-6)
    # ... and without model_args the mode and budget are config.json's (sparse, 2 blocks).
    assert word_ppl("config") == pytest.approx(word_ppl("sparse"), rel=1e-9)
