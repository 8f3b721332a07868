// Conversations for `data.format: chat`: JSONL lines {"messages": [{"role", "content"}]} rendered
// with a model family's chat template into token ids whose loss covers the assistant turns only.
//
// mole renders the templates itself (no Jinja engine). The families, with what each writes for a
// training conversation (tests/tokenizer_fixtures/chat/ holds the official templates and their
// renderings by a Jinja engine, which these equal):
//   llama3   LLaMA-3:  <|begin_of_text|> then per message
//            <|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>, content trimmed.
//   llama3.1 LLaMA-3.1 / 3.3 (no tools): the same turns after a system turn that always comes
//            first: "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" and
//            the system message, if any (the template's default date).
//   chatml   Qwen2 / 2.5 (ChatML): per message <|im_start|>ROLE\nCONTENT<|im_end|>\n; no BOS.
//            A conversation without a system message first gets the default one that the
//            model's own template writes (Qwen2.5: "You are Qwen, created by Alibaba Cloud. ...").
//   mistral  Mistral Instruct v0.3: <s>[INST] USER[/INST] ASSISTANT</s>..., the system message
//            before the last user message ("[INST] SYSTEM\n\nUSER[/INST]"). The official
//            template writes it only when the conversation ends with a user message, so it would
//            drop it from every training conversation; mole keeps it, where the model sees it
//            at inference.
//   llama2   LLaMA-2 chat: <s>[INST] USER [/INST] ASSISTANT </s>..., the system message as
//            <<SYS>>\nSYSTEM\n<</SYS>>\n\n before the first user message.
// mistral and llama2 need the roles to alternate user, assistant, ... after an optional first
// system message. Targets: each assistant message's content and the token that ends its turn
// (<|eot_id|>, <|im_end|>, </s>). The text between two special tokens is encoded as one string,
// as the library does for the rendered conversation, so the ids equal those of the whole
// rendered text; a token that straddles the end of a prompt and the start of an answer counts
// as answer.
#pragma once

#include <string>
#include <vector>

#include "launch/data.h"

namespace mole::launch {

struct ChatMessage {
  std::string role;  // system | user | assistant
  std::string content;
};

// The families above, in the order the docs list them.
const std::vector<std::string>& chat_template_names();

// The family of a Jinja chat template by the markers it writes (<|start_header_id|>,
// <|im_start|>, <<SYS>> with [INST], [INST]); "" when none matches, and for relatives that write
// more or differently (Qwen3's <think> blocks, ChatML with a BOS, Mistral v0.1/v0.2's " [INST] "
// spacing): those need data.template, knowingly.
std::string recognise_chat_template(const std::string& jinja);

struct ChatTemplate {
  std::string family;          // one of chat_template_names()
  std::string default_system;  // chatml: written when a conversation starts without a system message
};

// data.template: a family name, or "auto" for the family of the tokenizer's own template. An
// absent or unrecognised template under "auto" is an error that lists the families. The default
// system message comes from the tokenizer's template (a literal
// '<|im_start|>system\nTEXT<|im_end|>' in it) when that is of the same family.
ChatTemplate resolve_chat_template(const std::string& configured, const Tokenizer& tokenizer);

// A rendered conversation: text, a special token written by name, or BOS / EOS (the tokenizer's).
struct ChatPiece {
  enum class Kind { kText, kToken, kBos, kEos };
  Kind kind = Kind::kText;
  std::string text;     // kText: the text; kToken: the token as written (e.g. "<|eot_id|>")
  bool target = false;  // in the loss
};

// Renders `messages` with `family`. Errors (unknown role, no assistant message, roles that the
// template cannot take) begin with `where`.
std::vector<ChatPiece> render_chat(const ChatTemplate& style, const std::vector<ChatMessage>& messages,
                                   const std::string& where);

// The rendered conversation as one string, BOS and EOS written as `bos` and `eos`.
std::string chat_text(const std::vector<ChatPiece>& pieces, const std::string& bos, const std::string& eos);

// Token ids and labels (-100 outside the targets), not truncated. A special token or BOS/EOS the
// tokenizer lacks is an error naming it and `where`.
Example encode_chat(const std::vector<ChatPiece>& pieces, const Tokenizer& tokenizer, const std::string& where);

}  // namespace mole::launch
