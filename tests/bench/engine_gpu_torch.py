#!/usr/bin/env python3
"""PyTorch reference for tests/bench/engine_gpu: the same Llama-3 shapes
(random bf16 weights), prompt length, decode steps and batch sizes, run with
Hugging Face transformers' LlamaForCausalLM in eager mode (prefill with a KV
cache, then greedy decode one token per step). Prints tokens/s for the ratio
with engine_gpu. Usage: engine_gpu_torch.py [8b|1b] [--prompt N] [--steps N]
[--batches 1,32,128,256]. Needs a GPU, torch and transformers."""
import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "8b": dict(name="Llama-3-8B", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, tie=False),
    "1b": dict(name="Llama-3.2-1B", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, tie=True),
}


def forward(model, ids, **kw):
    """Runs the model keeping only the last position's logits when transformers allows it."""
    for extra in ({"logits_to_keep": 1}, {"num_logits_to_keep": 1}, {}):
        try:
            return model(ids, **kw, **extra)
        except TypeError:
            continue
    raise RuntimeError("model forward failed")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="8b", choices=SHAPES)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batches", default="1,32,128,256")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: skipped")
        raise SystemExit(77)
    s = dict(SHAPES[a.model])
    name, tie = s.pop("name"), s.pop("tie")
    cfg = LlamaConfig(**s, max_position_embeddings=8192, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192},
                      tie_word_embeddings=tie, torch_dtype=torch.bfloat16)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model.eval()
    print(f"pytorch {torch.__version__}, {torch.cuda.get_device_name()}, {name} shapes, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
    rows = []
    with torch.inference_mode():
        for B in [int(x) for x in a.batches.split(",")]:
            ids = torch.randint(0, cfg.vocab_size, (B, a.prompt), device="cuda")
            # Prefill throughput: passes of about 2048 tokens, as engine_gpu runs them.
            group = max(1, 2048 // a.prompt)
            forward(model, ids[:group], use_cache=False)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for g in range(0, B, group):
                forward(model, ids[g:g + group], use_cache=False)
            torch.cuda.synchronize()
            tp = time.perf_counter() - t0
            # Decode: one cache for the whole batch, filled in slices of the prompt
            # (about 32k tokens per forward, to bound the activations).
            pkv, sl = None, max(1, 32768 // B)
            for s0 in range(0, a.prompt, sl):
                out = forward(model, ids[:, s0:s0 + sl], past_key_values=pkv, use_cache=True)
                pkv = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            del out
            rows.append((f"prefill {a.prompt}-token prompts (B={B})", B * a.prompt / tp))
            for step in range(a.steps + 2):
                if step == 2:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                out = model(nxt, past_key_values=pkv, use_cache=True)
                pkv = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            rows.append((f"decode batch {B}", B * a.steps / (time.perf_counter() - t0)))
            del pkv, out, nxt
            torch.cuda.empty_cache()
    print(f"\n{'pytorch (HF eager)':<36} {'tokens/s':>12}")
    for what, tps in rows:
        print(f"{what:<36} {tps:>12.0f}")


if __name__ == "__main__":
    main()
