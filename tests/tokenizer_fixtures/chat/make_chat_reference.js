// Reference chat-template renderings for mole's built-in chat formats, made by a real Jinja
// engine (Hugging Face's `@huggingface/jinja`, the engine transformers.js uses for
// apply_chat_template) from the models' own chat_template strings in templates/ (provenance:
// templates/SOURCES.md). Never regenerate this file's output with mole.
//
//   npm install @huggingface/jinja@0.5.11      (in a scratch directory, e.g. /tmp/jinja)
//   NODE_PATH=/tmp/jinja/node_modules node make_chat_reference.js
//
// (or run it from a directory whose node_modules holds the package). It reads
// conversations.json and templates/*.jinja beside this script and writes chat_reference.json
// beside it: for every family, every conversation rendered with add_generation_prompt=false,
// the family's bos_token/eos_token, and raise_exception throwing (this engine defines it as a
// global that throws; passing our own is refused as a redeclaration, so the script checks the
// built-in instead). A rendering that throws is recorded as {"error": message}.
'use strict';
const fs = require('fs');
const path = require('path');
const { Template } = require('@huggingface/jinja');

const JINJA_VERSION = '0.5.11';

const here = __dirname;

// key -> template file and special tokens. The first four are the families mole renders;
// the next two are older siblings kept for comparison; the last two are newer models.
const families = {
  // meta-llama/Meta-Llama-3-8B-Instruct (Llama 3.0). The template does not use eos_token.
  llama3: { file: 'llama3.jinja', bos_token: '<|begin_of_text|>', eos_token: '<|end_of_text|>' },
  // Qwen/Qwen2.5-7B-Instruct (ChatML). Qwen has no BOS token; the template uses neither.
  chatml: { file: 'chatml.jinja', bos_token: '', eos_token: '<|im_end|>' },
  // mistralai/Mistral-7B-Instruct-v0.3 ("v3" tokenizer).
  mistral: { file: 'mistral.jinja', bos_token: '<s>', eos_token: '</s>' },
  // meta-llama/Llama-2-7b-chat-hf.
  llama2: { file: 'llama2.jinja', bos_token: '<s>', eos_token: '</s>' },
  // Qwen/Qwen2-7B-Instruct (ChatML, older template).
  chatml_qwen2: { file: 'chatml_qwen2.jinja', bos_token: '', eos_token: '<|im_end|>' },
  // mistralai/Mistral-7B-Instruct-v0.2 ("v1" tokenizer template).
  mistral_v02: { file: 'mistral_v0.2.jinja', bos_token: '<s>', eos_token: '</s>' },
  // meta-llama/Llama-3.1-8B-Instruct. The template does not use eos_token; <|eot_id|> is
  // the end-of-turn token (not checked against the model's tokenizer_config.json here).
  'llama3.1': { file: 'llama3.1.jinja', bos_token: '<|begin_of_text|>', eos_token: '<|eot_id|>' },
  // Qwen/Qwen3-0.6B (Qwen3 hybrid-thinking template as of May 2025). No BOS token; the
  // template uses neither token. This engine ignores the argument of str.lstrip/strip, so
  // where the last assistant message starts with spaces the output differs from Python
  // Jinja2 (see templates/SOURCES.md).
  qwen3: { file: 'qwen3.jinja', bos_token: '', eos_token: '<|im_end|>' },
};

// The package's "exports" hide package.json, so find it from the resolved entry point.
function installedVersion() {
  let dir = path.dirname(require.resolve('@huggingface/jinja'));
  while (!fs.existsSync(path.join(dir, 'package.json'))) dir = path.dirname(dir);
  return JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')).version;
}
const installed = installedVersion();
if (installed !== JINJA_VERSION) {
  throw new Error(`@huggingface/jinja ${installed} found, ${JINJA_VERSION} expected`);
}

// raise_exception must throw, as transformers' does.
let raised = false;
try {
  new Template("{{ raise_exception('check') }}").render({});
} catch (e) {
  raised = true;
}
if (!raised) throw new Error('raise_exception did not throw');

const conversations = JSON.parse(fs.readFileSync(path.join(here, 'conversations.json'), 'utf8'));

const out = { jinja_version: JINJA_VERSION, add_generation_prompt: false, families: {} };
for (const [name, fam] of Object.entries(families)) {
  const source = fs.readFileSync(path.join(here, 'templates', fam.file), 'utf8');
  const template = new Template(source);
  const rendered = conversations.map((conv) => {
    try {
      return template.render({
        messages: JSON.parse(JSON.stringify(conv.messages)),
        bos_token: fam.bos_token,
        eos_token: fam.eos_token,
        add_generation_prompt: false,
      });
    } catch (e) {
      return { error: e && e.message ? e.message : String(e) };
    }
  });
  out.families[name] = {
    template: 'templates/' + fam.file,
    bos_token: fam.bos_token,
    eos_token: fam.eos_token,
    rendered,
  };
}

fs.writeFileSync(path.join(here, 'chat_reference.json'), JSON.stringify(out, null, 2) + '\n');
const errors = Object.values(out.families)
  .reduce((n, f) => n + f.rendered.filter((r) => typeof r !== 'string').length, 0);
console.log(`wrote chat_reference.json: ${Object.keys(families).length} families x ` +
  `${conversations.length} conversations, ${errors} errors`);
