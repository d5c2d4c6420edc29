#!/usr/bin/python3
"""Checks the engine's CPU backend against ref_forward.py on one test model.

    check_model.py SE_LOGITS MODEL_DIR [MODEL_DIR ...]
    check_model.py SE_LOGITS --stamp MODELS.stamp   (every model mkmodel.py --all wrote)

For each model, three prompts (seeded from the model's name) run through
se_logits in shared batches (sequence 1 in chunks: chunked prefill; then
decode one token per pass, 16 tokens each, greedy). Checks:

  * logits: for every token fed, the relative error max|c - r| / max|r|
    over the row (c = engine, r = reference, float64) is at most 1e-4;
  * greedy generation: at every generated position the reference's argmax
    equals the engine's token, so the reference's own greedy continuation of
    the prompt is the same 16 tokens.

Exit 0 when all pass, 1 otherwise (each failure printed).
"""
import json
import os
import subprocess
import sys
import tempfile
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ref_forward  # noqa: E402

GEN = 16
TOL = 1e-4


def check(exe, d):
    name = os.path.basename(os.path.normpath(d))
    ref = ref_forward.Model(d)
    V = ref.cfg['vocab_size']
    rng = np.random.default_rng(zlib.crc32(name.split('-')[0].encode()))
    prompts = [list(map(int, rng.integers(0, V, n))) for n in (7, 13, 5)]
    ok = True
    # AVX2 matrix-vector kernels with sgemm from 4 rows (so prefill passes take the sgemm
    # path, on the fp32 copies of 16-bit weights), the same without the copies (sgemm
    # widens per call), then the portable kernels with the default threshold (everything
    # matrix-vector).
    runs = ('default', 'widen', 'generic') if '-f32' not in name else ('default', 'generic')
    for kernels in runs:
        ok = check_run(exe, d, name + ' (%s kernels)' % kernels, ref, prompts, kernels) and ok
    return ok


def check_run(exe, d, name, ref, prompts, kernels):
    V = ref.cfg['vocab_size']
    env = dict(os.environ)
    if kernels == 'generic':
        env['SPOOL_CPU_KERNELS'] = 'generic'
    else:
        env['SPOOL_CPU_GEMM_MIN_ROWS'] = '4'
    if kernels == 'widen':
        env['SPOOL_CPU_F32_BYTES'] = '0'
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'logits.bin')
        args = [exe, d, out, str(GEN), '5', '4'] + [','.join(map(str, p)) for p in prompts]
        res = subprocess.run(args, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            print('%s: se_logits failed: %s' % (name, res.stderr.strip()))
            return False
        gen = json.loads(res.stdout)['generated']
        raw = np.fromfile(out, dtype=np.uint8)
    rowsz = 8 + 4 * V
    nrows = len(raw) // rowsz
    raw = raw[:nrows * rowsz].reshape(nrows, rowsz)
    hdr = raw[:, :8].copy().view('<i4').reshape(nrows, 2)
    got = raw[:, 8:].copy().view('<f4').reshape(nrows, V)
    ok = True
    worst = 0.0
    for s, p in enumerate(prompts):
        if len(gen[s]) != GEN:
            print('%s: sequence %d generated %d tokens, expected %d' % (name, s, len(gen[s]), GEN))
            return False
        ids = p + gen[s]
        want = ref.forward(ids[:-1])
        mine = {int(hdr[r, 1]): got[r] for r in range(nrows) if hdr[r, 0] == s}
        if sorted(mine) != list(range(len(ids) - 1)):
            print('%s: sequence %d: rows for positions %s' % (name, s, sorted(mine)))
            return False
        for pos in range(len(ids) - 1):
            r = want[pos]
            rel = float(np.max(np.abs(mine[pos] - r)) / np.max(np.abs(r)))
            worst = max(worst, rel)
            if rel > TOL:
                print('%s: sequence %d position %d: relative error %.3g > %g' % (name, s, pos, rel, TOL))
                ok = False
            if pos >= len(p) - 1 and int(np.argmax(r)) != ids[pos + 1]:
                top = np.sort(r)[-2:]
                print('%s: sequence %d position %d: engine chose %d, reference %d (gap %.3g)' %
                      (name, s, pos, ids[pos + 1], int(np.argmax(r)), top[1] - top[0]))
                ok = False
    print('%s: %s (worst relative error %.2e, %d rows, greedy %d x %d tokens)' %
          ('ok' if ok else 'FAIL', name, worst, nrows, len(prompts), GEN))
    return ok


def main(argv):
    exe, dirs = argv[0], argv[1:]
    if dirs and dirs[0] == '--stamp':
        base = os.path.join(os.path.dirname(os.path.abspath(dirs[1])), 'models')
        with open(dirs[1]) as f:
            dirs = [os.path.join(base, n) for n in f.read().split()]
        if not dirs:
            print('no models listed in the stamp file')
            return 1
    bad = [d for d in dirs if not check(exe, d)]
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
