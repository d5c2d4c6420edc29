#!/usr/bin/env python3
"""Writes a Hugging Face model directory (config.json, generation_config.json,
model-0000N-of-0000M.safetensors and model.safetensors.index.json) with
Llama-3 shapes and random bf16 weights, for benchmarks on the machine where
it runs. Needs only NumPy; the safetensors files are written directly (an
8-byte header length, a JSON header, then the raw tensors).

Usage: make_synthetic_model.py {8b,1b,tiny} OUT_DIR [--layers N] [--seed S]
  8b    Llama-3-8B   (32 layers, hidden 4096, 16 GB)
  1b    Llama-3.2-1B (16 layers, hidden 2048, tied embeddings, 2.5 GB)
  tiny  a 2-layer model with the same structure, for quick checks
No tokenizer is written: the weights are random, so only token ids matter.
Weights are N(0, 0.02) rounded to bf16 (by truncation); norms are near 1.
"""
import argparse
import json
import os
import sys

import numpy as np

SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
               rope_theta=500000.0, rope_scaling=None, tie_word_embeddings=False),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
               rope_theta=500000.0,
               rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
               tie_word_embeddings=True),
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                 rope_theta=500000.0, rope_scaling=None, tie_word_embeddings=False),
}
SHARD_BYTES = 5 << 30


def bf16_random(rng, shape, scale, offset=0.0):
    """Random bf16 values as uint16 bit patterns (float32 truncated to its top half)."""
    n = int(np.prod(shape))
    out = np.empty(n, dtype=np.uint16)
    step = 1 << 24
    for at in range(0, n, step):
        k = min(step, n - at)
        f = (rng.standard_normal(k, dtype=np.float32) * np.float32(scale) + np.float32(offset))
        out[at:at + k] = (f.view(np.uint32) >> 16).astype(np.uint16)
    return out


def tensors(cfg):
    """(name, shape, scale, offset) of every tensor, in Hugging Face's names and layout."""
    h, im = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (cfg["vocab_size"], h), 0.02, 0.0
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,), 0.05, 1.0
        yield p + "self_attn.q_proj.weight", (q, h), 0.02, 0.0
        yield p + "self_attn.k_proj.weight", (kv, h), 0.02, 0.0
        yield p + "self_attn.v_proj.weight", (kv, h), 0.02, 0.0
        yield p + "self_attn.o_proj.weight", (h, q), 0.02, 0.0
        yield p + "post_attention_layernorm.weight", (h,), 0.05, 1.0
        yield p + "mlp.gate_proj.weight", (im, h), 0.02, 0.0
        yield p + "mlp.up_proj.weight", (im, h), 0.02, 0.0
        yield p + "mlp.down_proj.weight", (h, im), 0.02, 0.0
    yield "model.norm.weight", (h,), 0.05, 1.0
    if not cfg["tie_word_embeddings"]:
        yield "lm_head.weight", (cfg["vocab_size"], h), 0.02, 0.0


def write_shard(path, items):
    header, off = {}, 0
    for name, shape, data in items:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + data.nbytes]}
        off += data.nbytes
    header["__metadata__"] = {"format": "pt"}
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    with open(path, "wb") as f:
        f.write(len(hj).to_bytes(8, "little"))
        f.write(hj)
        for _, _, data in items:
            data.tofile(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shape", choices=SHAPES)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = dict(SHAPES[a.shape])
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    specs = list(tensors(cfg))
    # Group into shards of at most SHARD_BYTES, then write each as it fills.
    shards, cur, size = [], [], 0
    for s in specs:
        nbytes = 2 * int(np.prod(s[1]))
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        items = [(n, shp, bf16_random(rng, shp, sc, o)) for n, shp, sc, o in shard]
        write_shard(os.path.join(a.out, fname), items)
        for n, _, d in items:
            weight_map[n] = fname
            total += d.nbytes
        print(f"wrote {fname} ({sum(d.nbytes for _, _, d in items) / 2**30:.2f} GiB)", file=sys.stderr)
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_act": "silu", "attention_bias": False, "rms_norm_eps": 1e-5,
              "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
              "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"], **cfg}
    if config["vocab_size"] <= 128001:
        config["bos_token_id"], config["eos_token_id"] = 1, 2
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(a.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, f,
                  indent=1)
    print(f"{a.out}: {a.shape} shapes, {total / 2**30:.2f} GiB of bf16 weights", file=sys.stderr)


if __name__ == "__main__":
    main()
