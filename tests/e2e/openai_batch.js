// The OpenAI Batch API through the official openai npm client against a
// running spool-scheduler (HTTP) and spool-worker. Run by openai_batch.sh:
//   node openai_batch.js NODE_DIR BASE_URL KEY_A KEY_B SPOOL MODEL_DIR WORK_DIR KEY_OPS
// (KEY_OPS: an admin key of a third tenant.)
// Exits 0 when every check holds; otherwise prints what differed and exits 1.
'use strict';
const assert = require('assert/strict');
const { execFileSync } = require('child_process');
const fs = require('fs');
const path = require('path');

const [, , nodeDir, base, keyA, keyB, spool, modelDir, work, keyOps] = process.argv;
const OpenAI = require(path.join(nodeDir, 'node_modules', 'openai'));

const a = new OpenAI({ apiKey: keyA, baseURL: base + '/v1', maxRetries: 0, timeout: 30000 });
const b = new OpenAI({ apiKey: keyB, baseURL: base + '/v1', maxRetries: 0, timeout: 30000 });
const ops = new OpenAI({ apiKey: keyOps, baseURL: base + '/v1', maxRetries: 0, timeout: 30000 });
const params = { max_tokens: 8, temperature: 0.8, top_p: 0.95, seed: 42 };

// The reference: spool generate on the same inputs and parameters.
function reference(inputs) {
  const f = path.join(work, `ref-${Date.now()}.jsonl`);
  fs.writeFileSync(f, inputs.map((x) => JSON.stringify(x)).join('\n') + '\n');
  const out = execFileSync(spool, ['generate', '--model', modelDir, '--prompts', f, '--json',
    '--max-tokens', '8', '--temperature', '0.8', '--top-p', '0.95', '--seed', '42'],
  { encoding: 'utf8', maxBuffer: 64 << 20 });
  // Results come as they finish: put them back in input order.
  const ref = [];
  for (const l of out.trim().split('\n')) {
    const r = JSON.parse(l);
    ref[r.index] = { ...r, text: r.text.replace(/\u0000/g, '\uFFFD') };
  }
  assert.equal(ref.filter((r) => r).length, inputs.length);
  return ref;
}

async function expectStatus(promise, status, what) {
  try {
    await promise;
  } catch (e) {
    assert.equal(e.status, status, `${what}: got ${e.status} ${e.message}`);
    return e;
  }
  assert.fail(`${what}: expected HTTP ${status}, got success`);
}

async function waitFor(client, id, states, seconds = 120) {
  const t0 = Date.now();
  for (;;) {
    const bt = await client.batches.retrieve(id);
    if (states.includes(bt.status)) return bt;
    if (Date.now() - t0 > seconds * 1000) {
      assert.fail(`batch ${id} still ${bt.status} after ${seconds} s: ${JSON.stringify(bt)}`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}

function parseJsonl(text) {
  return text.split('\n').filter((l) => l.length > 0).map((l) => JSON.parse(l));
}

async function chatBatch() {
  const N = 40;
  const lines = [];
  const inputs = [];
  for (let i = 1; i <= N; i++) {
    const messages = [{ role: 'user', content: `request ${i} about ${['tea', 'ships', 'a fox'][i % 3]}` }];
    inputs.push({ messages });
    lines.push(JSON.stringify({ custom_id: `c${i}`, method: 'POST', url: '/v1/chat/completions',
      body: { model: 'tiny', messages, ...params } }));
  }
  // Bad lines, at known (1-based) line numbers.
  const bad = [
    [4, 'this is not JSON', 'invalid_json'],
    [9, JSON.stringify({ custom_id: 'c1', method: 'POST', url: '/v1/chat/completions',
      body: { model: 'tiny', messages: [{ role: 'user', content: 'again' }] } }), 'duplicate_custom_id'],
    [15, JSON.stringify({ custom_id: 'nomsg', method: 'POST', url: '/v1/chat/completions',
      body: { model: 'tiny' } }), 'missing_required_parameter'],
  ];
  for (const [line, text] of bad) lines.splice(line - 1, 0, text);
  const jsonl = lines.join('\n') + '\n';

  const file = await a.files.create({ file: await OpenAI.toFile(Buffer.from(jsonl), 'chat.jsonl'), purpose: 'batch' });
  assert.match(file.id, /^file-/);
  assert.equal(file.object, 'file');
  assert.equal(file.bytes, Buffer.byteLength(jsonl));
  assert.equal(file.purpose, 'batch');
  assert.equal(file.filename, 'chat.jsonl');
  const again = await a.files.retrieve(file.id);
  assert.equal(again.id, file.id);
  const content = await (await a.files.content(file.id)).text();
  assert.equal(content, jsonl);

  const created = await a.batches.create({ input_file_id: file.id, endpoint: '/v1/chat/completions',
    completion_window: '24h', metadata: { run: 'e2e' } });
  assert.match(created.id, /^batch_/);
  assert.equal(created.object, 'batch');
  assert.equal(created.status, 'in_progress');
  assert.equal(created.input_file_id, file.id);
  assert.deepEqual(created.metadata, { run: 'e2e' });
  assert.equal(created.request_counts.total, N + bad.length);

  const ref = reference(inputs);
  const done = await waitFor(a, created.id, ['completed', 'failed', 'cancelled', 'expired']);
  assert.equal(done.status, 'completed', JSON.stringify(done));
  assert.deepEqual(done.request_counts, { total: N + bad.length, completed: N, failed: bad.length });
  assert.ok(done.completed_at >= done.created_at);

  // Every custom_id exactly once, with the reference's text and usage.
  const out = parseJsonl(await (await a.files.content(done.output_file_id)).text());
  assert.equal(out.length, N);
  const seen = new Set();
  for (const l of out) {
    assert.ok(!seen.has(l.custom_id), `custom_id ${l.custom_id} twice`);
    seen.add(l.custom_id);
    const i = Number(l.custom_id.slice(1));
    assert.ok(i >= 1 && i <= N, l.custom_id);
    assert.equal(l.error, null);
    assert.equal(l.response.status_code, 200);
    const body = l.response.body;
    assert.equal(body.object, 'chat.completion');
    assert.equal(body.model, 'tiny@1');
    assert.equal(body.choices[0].message.role, 'assistant');
    assert.equal(body.choices[0].message.content, ref[i - 1].text, `text of ${l.custom_id}`);
    assert.equal(body.choices[0].finish_reason, ref[i - 1].finish_reason === 'length' ? 'length' : 'stop');
    assert.equal(body.usage.completion_tokens, ref[i - 1].completion_tokens);
    assert.equal(body.usage.prompt_tokens, ref[i - 1].prompt_tokens);
  }

  // The bad lines, with their line numbers.
  const errs = parseJsonl(await (await a.files.content(done.error_file_id)).text());
  assert.equal(errs.length, bad.length);
  errs.forEach((e, k) => {
    assert.equal(e.response, null);
    assert.equal(e.error.line, bad[k][0]);
    assert.equal(e.error.code, bad[k][2]);
    assert.ok(e.error.message.startsWith(`line ${bad[k][0]}: `), e.error.message);
  });

  // Listing.
  const list = await a.batches.list({ limit: 10 });
  assert.ok(list.data.some((x) => x.id === created.id));
  return { file, batch: done };
}

async function completionBatch() {
  const prompts = ['Once upon a time', 'The lighthouse', 'Tea is'];
  const jsonl = prompts.map((p, i) => JSON.stringify({ custom_id: `p${i}`, method: 'POST',
    url: '/v1/completions', body: { model: 'tiny', prompt: p, ...params } })).join('\n');
  // A raw JSONL body (no multipart), as curl might send it.
  const res = await fetch(`${base}/v1/files?purpose=batch&filename=raw.jsonl`, {
    method: 'POST', body: jsonl,
    headers: { authorization: `Bearer ${keyA}`, 'content-type': 'application/jsonl' } });
  assert.equal(res.status, 200);
  const file = await res.json();
  assert.equal(file.filename, 'raw.jsonl');
  const created = await a.batches.create({ input_file_id: file.id, endpoint: '/v1/completions',
    completion_window: '24h' });
  const ref = reference(prompts.map((p) => ({ prompt: p })));
  const done = await waitFor(a, created.id, ['completed', 'failed', 'cancelled', 'expired']);
  assert.equal(done.status, 'completed');
  assert.equal(done.error_file_id, null);
  const out = parseJsonl(await (await a.files.content(done.output_file_id)).text());
  assert.equal(out.length, prompts.length);
  for (const l of out) {
    const i = Number(l.custom_id.slice(1));
    assert.equal(l.response.body.object, 'text_completion');
    assert.equal(l.response.body.choices[0].text, ref[i].text);
  }
}

async function errorsAndCancel() {
  let e = await expectStatus(a.batches.create({ input_file_id: 'file-nothere', endpoint: '/v1/chat/completions',
    completion_window: '24h' }), 400, 'unknown input file');
  assert.equal(e.param, 'input_file_id');
  e = await expectStatus(a.batches.create({ input_file_id: 'file-x', completion_window: '24h' }), 400,
    'missing endpoint');
  assert.equal(e.param, 'endpoint');
  e = await expectStatus(a.files.create({ file: await OpenAI.toFile(Buffer.from('{}'), 'x.jsonl'),
    purpose: 'fine-tune' }), 400, 'wrong purpose');
  assert.equal(e.param, 'purpose');
  await expectStatus(a.batches.retrieve('batch_nothere'), 404, 'unknown batch');

  // Cancel: a bigger batch cancelled at once ends "cancelled", keeping what finished.
  const lines = [];
  for (let i = 0; i < 300; i++) {
    lines.push(JSON.stringify({ custom_id: `x${i}`, method: 'POST', url: '/v1/chat/completions',
      body: { model: 'tiny', messages: [{ role: 'user', content: `long story ${i}` }], max_tokens: 64, ignore_eos: true } }));
  }
  const file = await a.files.create({ file: await OpenAI.toFile(Buffer.from(lines.join('\n')), 'big.jsonl'), purpose: 'batch' });
  const created = await a.batches.create({ input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
  const inUse = await expectStatus(a.files.delete(file.id), 409, "deleting an open batch's input");
  assert.equal(inUse.param, 'id');
  assert.ok(inUse.message.includes(created.id), inUse.message);
  const c = await a.batches.cancel(created.id);
  assert.equal(c.status, 'cancelling');
  const done = await waitFor(a, created.id, ['cancelled', 'completed', 'failed', 'expired'], 30);
  assert.equal(done.status, 'cancelled');
  assert.ok(done.cancelled_at >= done.cancelling_at);
  assert.ok(done.request_counts.completed < 300, JSON.stringify(done.request_counts));
  const errs = parseJsonl(await (await a.files.content(done.error_file_id)).text());
  assert.equal(errs.length, 300 - done.request_counts.completed);
  assert.ok(errs.every((x) => x.error.code === 'batch_cancelled'));
  console.log(`cancelled batch: ${done.request_counts.completed} of 300 had finished`);
}

async function tenantIsolation(file, batch) {
  await expectStatus(b.batches.retrieve(batch.id), 404, "B reads A's batch");
  await expectStatus(b.batches.cancel(batch.id), 404, "B cancels A's batch");
  await expectStatus(b.files.retrieve(file.id), 404, "B reads A's file");
  await expectStatus(b.files.content(batch.output_file_id), 404, "B reads A's output");
  await expectStatus(b.batches.create({ input_file_id: file.id, endpoint: '/v1/chat/completions',
    completion_window: '24h' }), 400, "B makes a batch of A's file");
  const bl = await b.batches.list();
  assert.equal(bl.data.length, 0);
  const fl = await b.files.list();
  assert.equal(fl.data.length, 0);
  const bad = new OpenAI({ apiKey: 'sk-spool-nope', baseURL: base + '/v1', maxRetries: 0 });
  await expectStatus(bad.batches.list(), 401, 'an unknown key');
  await expectStatus(b.files.delete(file.id), 404, "B deletes A's file");
}

// An admin key (of another tenant) sees and reads A's batches and files;
// then A deletes its finished batch's input file, which the batch still names.
async function adminAndDelete(file, batch) {
  const bl = await ops.batches.list({ limit: 100 });
  assert.ok(bl.data.some((x) => x.id === batch.id), 'the admin key lists A\'s batch');
  assert.equal((await ops.batches.retrieve(batch.id)).status, 'completed');
  assert.equal((await ops.files.retrieve(file.id)).id, file.id);
  const out = await (await ops.files.content(batch.output_file_id)).text();
  assert.equal(out, await (await a.files.content(batch.output_file_id)).text());
  const d = await a.files.delete(file.id);
  assert.deepEqual({ id: d.id, object: d.object, deleted: d.deleted }, { id: file.id, object: 'file', deleted: true });
  await expectStatus(a.files.retrieve(file.id), 404, 'a deleted file');
  assert.equal((await a.batches.retrieve(batch.id)).input_file_id, file.id);
}

(async () => {
  const { file, batch } = await chatBatch();
  console.log(`chat batch ${batch.id}: ${batch.request_counts.completed} outputs match spool generate; bad lines in the error file`);
  await completionBatch();
  console.log('completions batch (raw JSONL upload): outputs match');
  await errorsAndCancel();
  console.log('errors and cancel: ok');
  await tenantIsolation(file, batch);
  console.log('tenant B sees nothing of tenant A: ok');
  await adminAndDelete(file, batch);
  console.log('an admin key sees every tenant; files deleted: ok');
})().catch((e) => {
  console.error('FAIL:', e && e.stack ? e.stack : e);
  process.exit(1);
});
