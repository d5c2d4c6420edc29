// The official openai npm client against a running spool-scheduler: chat and
// completions, streaming and not, model listing, and an invalid parameter.
// Usage: node openai_live.mjs PORT KEY; prints one JSON object of what it saw.
import OpenAI from 'openai';

const [port, key] = process.argv.slice(2);
const client = new OpenAI({ apiKey: key, baseURL: `http://127.0.0.1:${port}/v1`, maxRetries: 0 });
const messages = [{ role: 'system', content: 'be brief' }, { role: 'user', content: 'hi' }];
const out = {};

const chat = await client.chat.completions.create({ model: 'demo', messages, max_tokens: 8 });
out.chat = chat.choices[0].message.content;
out.chat_model = chat.model;
out.chat_finish = chat.choices[0].finish_reason;
out.chat_usage = chat.usage.total_tokens;

const stream = await client.chat.completions.create({
  model: 'demo', messages, stream: true, stream_options: { include_usage: true },
});
let text = '';
let usage = null;
for await (const chunk of stream) {
  if (chunk.choices.length) text += chunk.choices[0].delta.content ?? '';
  if (chunk.usage) usage = chunk.usage;
}
out.chat_stream = text;
out.chat_stream_usage = usage ? usage.total_tokens : null;

const cmpl = await client.completions.create({ model: 'demo@2', prompt: 'Once', max_tokens: 4 });
out.cmpl = cmpl.choices[0].text;
out.cmpl_model = cmpl.model;

const cstream = await client.completions.create({ model: 'demo@prod', prompt: 'Once', stream: true });
text = '';
for await (const chunk of cstream) text += chunk.choices[0]?.text ?? '';
out.cmpl_stream = text;

out.models = [];
for await (const m of client.models.list()) out.models.push(m.id);

try {
  await client.chat.completions.create({ model: 'demo', messages, n: 2 });
  out.err_status = 0;
} catch (e) {
  out.err_status = e.status;
  out.err_param = e.param;
}
console.log(JSON.stringify(out));
