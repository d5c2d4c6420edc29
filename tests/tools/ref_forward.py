#!/usr/bin/python3
"""An independent reference forward pass for Llama / Mistral / Qwen2 models.

Written from the semantics of Hugging Face transformers' modeling_llama.py,
modeling_mistral.py and modeling_qwen2.py (not from Spool's C code): token
embedding; per layer RMSNorm -> q/k/v projections (+ biases for Qwen2) ->
rotary embedding with rotate_half (inv_freq rescaled for rope_type llama3) ->
causal grouped-query attention with softmax -> o_proj -> residual; RMSNorm ->
down(silu(gate(x)) * up(x)) -> residual; final RMSNorm -> lm_head (the
embedding when tie_word_embeddings). Math in float64 over the weights as
stored (bf16/f16 widened exactly). Needs numpy only; has its own safetensors
reader.

    /usr/bin/python3 tests/tools/ref_forward.py MODEL_DIR 1,2,3 [--greedy N]
"""
import json
import math
import os
import struct
import sys

import numpy as np


def read_safetensors(path):
    with open(path, 'rb') as f:
        data = f.read()
    (n,) = struct.unpack('<Q', data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        b, e = info['data_offsets']
        raw = data[base + b:base + e]
        shape = tuple(info['shape'])
        dt = info['dtype']
        if dt == 'F32':
            a = np.frombuffer(raw, dtype='<f4')
        elif dt == 'F16':
            a = np.frombuffer(raw, dtype='<f2')
        elif dt == 'BF16':
            a = (np.frombuffer(raw, dtype='<u2').astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError('%s: dtype %s' % (name, dt))
        out[name] = a.astype(np.float64).reshape(shape)
    return out


class Model:
    def __init__(self, d):
        with open(os.path.join(d, 'config.json')) as f:
            self.cfg = c = json.load(f)
        idx = os.path.join(d, 'model.safetensors.index.json')
        self.w = {}
        if os.path.exists(idx):
            with open(idx) as f:
                files = sorted(set(json.load(f)['weight_map'].values()))
        else:
            files = ['model.safetensors']
        for fn in files:
            self.w.update(read_safetensors(os.path.join(d, fn)))
        self.h = c['hidden_size']
        self.nh = c['num_attention_heads']
        self.nkv = c.get('num_key_value_heads') or self.nh
        self.hd = c.get('head_dim') or self.h // self.nh
        self.eps = c.get('rms_norm_eps', 1e-6)
        self.L = c['num_hidden_layers']
        self.inv_freq = self._inv_freq()

    def _inv_freq(self):
        c = self.cfg
        base = c.get('rope_theta', 10000.0)
        inv = 1.0 / (base ** (np.arange(0, self.hd, 2, dtype=np.float64) / self.hd))
        rs = c.get('rope_scaling')
        if rs and rs.get('rope_type', rs.get('type')) == 'llama3':
            # transformers.modeling_rope_utils._compute_llama3_parameters
            factor = rs['factor']
            low, high = rs['low_freq_factor'], rs['high_freq_factor']
            old = rs['original_max_position_embeddings']
            low_wl, high_wl = old / low, old / high
            wl = 2 * math.pi / inv
            inv_l = np.where(wl > low_wl, inv / factor, inv)
            smooth = (old / wl - low) / (high - low)
            smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
            medium = ~(wl < high_wl) & ~(wl > low_wl)
            inv = np.where(medium, smoothed, inv_l)
        return inv

    def rmsnorm(self, x, w):
        var = np.mean(x * x, axis=-1, keepdims=True)
        return w * (x / np.sqrt(var + self.eps))

    @staticmethod
    def rotate_half(x):
        h = x.shape[-1] // 2
        return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)

    def forward(self, ids):
        """Logits (len(ids), vocab) for the whole sequence at once."""
        w = self.w
        T = len(ids)
        x = w['model.embed_tokens.weight'][np.asarray(ids)]
        pos = np.arange(T, dtype=np.float64)
        freqs = np.outer(pos, self.inv_freq)
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
        mask = np.triu(np.full((T, T), -np.inf), k=1)
        rep = self.nh // self.nkv
        for i in range(self.L):
            p = 'model.layers.%d.' % i
            r = x
            hs = self.rmsnorm(x, w[p + 'input_layernorm.weight'])

            def proj(n):
                y = hs @ w[p + 'self_attn.%s_proj.weight' % n].T
                b = w.get(p + 'self_attn.%s_proj.bias' % n)
                return y + b if b is not None else y
            q = proj('q').reshape(T, self.nh, self.hd)
            k = proj('k').reshape(T, self.nkv, self.hd)
            v = proj('v').reshape(T, self.nkv, self.hd)
            q = q * cos + self.rotate_half(q) * sin
            k = k * cos + self.rotate_half(k) * sin
            k = np.repeat(k, rep, axis=1)  # repeat_kv
            v = np.repeat(v, rep, axis=1)
            att = np.einsum('thd,shd->hts', q, k) / math.sqrt(self.hd) + mask
            att = np.exp(att - att.max(axis=-1, keepdims=True))
            att /= att.sum(axis=-1, keepdims=True)
            o = np.einsum('hts,shd->thd', att, v).reshape(T, self.nh * self.hd)
            x = r + o @ w[p + 'self_attn.o_proj.weight'].T
            r = x
            hs = self.rmsnorm(x, w[p + 'post_attention_layernorm.weight'])
            g = hs @ w[p + 'mlp.gate_proj.weight'].T
            u = hs @ w[p + 'mlp.up_proj.weight'].T
            x = r + ((g / (1 + np.exp(-g))) * u) @ w[p + 'mlp.down_proj.weight'].T
        x = self.rmsnorm(x, w['model.norm.weight'])
        head = w.get('lm_head.weight')
        if head is None or self.cfg.get('tie_word_embeddings'):
            head = w['model.embed_tokens.weight']
        return x @ head.T

    def greedy(self, ids, n):
        ids = list(ids)
        out = []
        for _ in range(n):
            t = int(np.argmax(self.forward(ids)[-1]))
            out.append(t)
            ids.append(t)
        return out


def main(argv):
    m = Model(argv[0])
    ids = [int(t) for t in argv[1].split(',')]
    if len(argv) > 3 and argv[2] == '--greedy':
        print(json.dumps(m.greedy(ids, int(argv[3]))))
    else:
        lg = m.forward(ids)
        print(json.dumps({"argmax": [int(a) for a in lg.argmax(-1)],
                          "last": [float(v) for v in lg[-1][:8]]}))


if __name__ == '__main__':
    main(sys.argv[1:])
