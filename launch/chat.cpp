// Chat templates rendered without a Jinja engine, and conversations encoded with loss masks
// (see chat.h).
#include "launch/chat.h"

#include <algorithm>
#include <cstdint>

#include "kernels/check.h"

namespace mole::launch {
namespace {

constexpr int64_t kIgnore = -100;

// Python's str.isspace() for one code point (what Jinja's trim and str.strip() remove).
bool is_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// The code point starting at s[i] and its length in bytes (a malformed byte: itself, length 1).
std::pair<uint32_t, size_t> decode_at(const std::string& s, size_t i) {
  const auto b = static_cast<unsigned char>(s[i]);
  const size_t n = b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xE ? 3 : (b >> 3) == 0x1E ? 4 : 1;
  if (n == 1 || i + n > s.size()) return {b, 1};
  uint32_t c = b & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) c = (c << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  return {c, n};
}

// Jinja's `trim` / Python's str.strip(): leading and trailing white space removed.
std::string trim(const std::string& s) {
  size_t begin = 0;
  while (begin < s.size()) {
    const auto [c, n] = decode_at(s, begin);
    if (!is_space(c)) break;
    begin += n;
  }
  size_t end = begin;  // one past the last non-space code point
  for (size_t i = begin; i < s.size();) {
    const auto [c, n] = decode_at(s, i);
    i += n;
    if (!is_space(c)) end = i;
  }
  return s.substr(begin, end - begin);
}

class Renderer {
 public:
  void bos() { pieces_.push_back({ChatPiece::Kind::kBos, "", false}); }
  void eos(bool target) { pieces_.push_back({ChatPiece::Kind::kEos, "", target}); }
  void token(std::string name, bool target) { pieces_.push_back({ChatPiece::Kind::kToken, std::move(name), target}); }
  void text(std::string text, bool target) {
    if (!text.empty()) pieces_.push_back({ChatPiece::Kind::kText, std::move(text), target});
  }
  std::vector<ChatPiece> take() { return std::move(pieces_); }

 private:
  std::vector<ChatPiece> pieces_;
};

void llama3_message(Renderer& r, const ChatMessage& m) {
  const bool answer = m.role == "assistant";
  r.token("<|start_header_id|>", false);
  r.text(m.role, false);
  r.token("<|end_header_id|>", false);
  r.text("\n\n", false);
  r.text(trim(m.content), answer);
  r.token("<|eot_id|>", answer);
}

std::vector<ChatPiece> render_llama3(const std::vector<ChatMessage>& messages) {
  Renderer r;
  r.bos();
  for (const ChatMessage& m : messages) llama3_message(r, m);
  return r.take();
}

// LLaMA-3.1 / 3.3 (no tools, the template's default date): a system turn always comes first,
// the date preamble before the system message (if any).
std::vector<ChatPiece> render_llama31(const std::vector<ChatMessage>& messages) {
  const bool has_system = messages.front().role == "system";
  Renderer r;
  r.bos();
  r.token("<|start_header_id|>", false);
  r.text("system", false);
  r.token("<|end_header_id|>", false);
  r.text("\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" +
             (has_system ? trim(messages.front().content) : std::string()),
         false);
  r.token("<|eot_id|>", false);
  for (size_t i = has_system ? 1 : 0; i < messages.size(); ++i) llama3_message(r, messages[i]);
  return r.take();
}

void chatml_message(Renderer& r, const ChatMessage& m) {
  const bool answer = m.role == "assistant";
  r.token("<|im_start|>", false);
  r.text(m.role + "\n", false);
  r.text(m.content, answer);
  r.token("<|im_end|>", answer);
  r.text("\n", false);
}

std::vector<ChatPiece> render_chatml(const std::vector<ChatMessage>& messages, const std::string& default_system) {
  Renderer r;
  if (!default_system.empty() && messages.front().role != "system") chatml_message(r, {"system", default_system});
  for (const ChatMessage& m : messages) chatml_message(r, m);
  return r.take();
}

// The default system message of a ChatML template: the text between "<|im_start|>system\n" and
// "<|im_end|>" inside one Jinja string literal ('...' or "..."; escapes \n \t \' \" \\ read
// as Jinja reads them). "" when the template has no such literal.
std::string chatml_default_system(const std::string& jinja) {
  const std::string open = "<|im_start|>system\n", close = "<|im_end|>";
  for (size_t i = 0; i < jinja.size(); ++i) {
    const char quote = jinja[i];
    if (quote != '\'' && quote != '"') continue;
    // The literal starting here, unescaped; i ends on its closing quote.
    std::string literal;
    size_t j = i + 1;
    for (; j < jinja.size() && jinja[j] != quote; ++j) {
      if (jinja[j] == '\\' && j + 1 < jinja.size()) {
        const char e = jinja[++j];
        literal += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
      } else {
        literal += jinja[j];
      }
    }
    if (j >= jinja.size()) break;  // unterminated: no literal can follow
    const size_t begin = literal.find(open);
    const size_t end = begin == std::string::npos ? begin : literal.find(close, begin + open.size());
    if (end != std::string::npos && end > begin + open.size()) return literal.substr(begin + open.size(), end - begin - open.size());
    i = j;
  }
  return {};
}

// mistral and llama2: an optional first system message, then user and assistant alternating.
void check_alternating(const std::vector<ChatMessage>& messages, size_t first, const std::string& family,
                       const std::string& where) {
  for (size_t i = first; i < messages.size(); ++i) {
    const char* expected = (i - first) % 2 == 0 ? "user" : "assistant";
    MOLE_CHECK(messages[i].role == expected, where, ": messages[", i, "] has role '", messages[i].role,
               "' but template ", family, " needs roles to alternate user, assistant, ... after an optional first "
               "system message");
  }
}

std::vector<ChatPiece> render_mistral(const std::vector<ChatMessage>& messages, const std::string& where) {
  const bool has_system = messages.front().role == "system";
  const size_t first = has_system ? 1 : 0;
  check_alternating(messages, first, "mistral", where);
  size_t last_user = first;
  for (size_t i = first; i < messages.size(); ++i) {
    if (messages[i].role == "user") last_user = i;
  }
  Renderer r;
  r.bos();
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "user") {
      const std::string system = has_system && i == last_user ? messages.front().content + "\n\n" : "";
      r.text("[INST] " + system + m.content + "[/INST]", false);
    } else {
      r.text(" " + trim(m.content), true);
      r.eos(true);
    }
  }
  return r.take();
}

std::vector<ChatPiece> render_llama2(const std::vector<ChatMessage>& messages, const std::string& where) {
  const bool has_system = messages.front().role == "system";
  const size_t first = has_system ? 1 : 0;
  check_alternating(messages, first, "llama2", where);
  Renderer r;
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "user") {
      const std::string content =
          i == first && has_system ? "<<SYS>>\n" + messages.front().content + "\n<</SYS>>\n\n" + m.content : m.content;
      r.bos();
      r.text("[INST] " + trim(content) + " [/INST]", false);
    } else {
      r.text(" " + trim(m.content) + " ", true);
      r.eos(true);
    }
  }
  return r.take();
}

}  // namespace

const std::vector<std::string>& chat_template_names() {
  static const std::vector<std::string> names = {"llama3", "llama3.1", "chatml", "mistral", "llama2"};
  return names;
}

std::string recognise_chat_template(const std::string& jinja) {
  const auto has = [&jinja](const char* marker) { return jinja.find(marker) != std::string::npos; };
  // Relatives that write more or differently are not taken for a family: Qwen3's <think> blocks,
  // ChatML with a BOS, Mistral v0.1/v0.2's " [INST] " spacing, a LLaMA-3.1 date other than 3.1's.
  if (has("<|start_header_id|>")) {
    if (!has("Cutting Knowledge Date")) return "llama3";
    return has("Today Date: ") && has("26 Jul 2024") ? "llama3.1" : "";
  }
  if (has("<|im_start|>")) return has("<think>") || has("bos_token") ? "" : "chatml";
  if (has("[INST]") && has("<<SYS>>")) return "llama2";
  if (has("[INST]")) return has(" [/INST]") || has(" [INST]") ? "" : "mistral";
  return {};
}

ChatTemplate resolve_chat_template(const std::string& configured, const Tokenizer& tokenizer) {
  const std::vector<std::string>& names = chat_template_names();
  std::string known;
  for (const std::string& n : names) known += (known.empty() ? "" : ", ") + n;
  const std::string& own = tokenizer.chat_template();
  const auto with_default = [&own](const std::string& family) {
    ChatTemplate t{family, ""};
    if (family == "chatml" && recognise_chat_template(own) == family) t.default_system = chatml_default_system(own);
    return t;
  };
  if (configured != "auto") {
    MOLE_CHECK(std::find(names.begin(), names.end(), configured) != names.end(), "data.template '", configured,
               "' is not one of auto, ", known);
    return with_default(configured);
  }
  MOLE_CHECK(!tokenizer.chat_template().empty(), "data.format chat: the tokenizer has no chat template "
             "(tokenizer_config.json's chat_template); set data.template to one of ", known);
  const std::string family = recognise_chat_template(tokenizer.chat_template());
  MOLE_CHECK(!family.empty(), "data.format chat: the tokenizer's chat template is none that mole renders (it "
             "recognises LLaMA-3 and 3.1 <|start_header_id|>, ChatML <|im_start|>, LLaMA-2 [INST] with <<SYS>>, Mistral "
             "[INST]); set data.template to one of ", known, " if one of them is the model's format");
  return with_default(family);
}

std::vector<ChatPiece> render_chat(const ChatTemplate& style, const std::vector<ChatMessage>& messages,
                                   const std::string& where) {
  const std::string& family = style.family;
  MOLE_CHECK(!messages.empty(), where, ": 'messages' is empty");
  bool answered = false;
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role;
    MOLE_CHECK(role == "system" || role == "user" || role == "assistant", where, ": messages[", i,
               "] has role '", role, "' (known: system, user, assistant)");
    answered = answered || role == "assistant";
  }
  MOLE_CHECK(answered, where, ": the conversation has no assistant message, so nothing to learn from");
  if (family == "llama3") return render_llama3(messages);
  if (family == "llama3.1") return render_llama31(messages);
  if (family == "chatml") return render_chatml(messages, style.default_system);
  if (family == "mistral") return render_mistral(messages, where);
  MOLE_CHECK(family == "llama2", "unknown chat template family '", family, "'");
  return render_llama2(messages, where);
}

std::string chat_text(const std::vector<ChatPiece>& pieces, const std::string& bos, const std::string& eos) {
  std::string out;
  for (const ChatPiece& p : pieces) {
    out += p.kind == ChatPiece::Kind::kBos ? bos : p.kind == ChatPiece::Kind::kEos ? eos : p.text;
  }
  return out;
}

Example encode_chat(const std::vector<ChatPiece>& pieces, const Tokenizer& tokenizer, const std::string& where) {
  Example e;
  const auto push = [&e](int64_t id, bool target) {
    e.input_ids.push_back(id);
    e.labels.push_back(target ? id : kIgnore);
  };
  for (size_t i = 0; i < pieces.size();) {
    const ChatPiece& p = pieces[i];
    if (p.kind != ChatPiece::Kind::kText) {
      const int64_t id = p.kind == ChatPiece::Kind::kBos   ? tokenizer.bos_id()
                         : p.kind == ChatPiece::Kind::kEos ? tokenizer.eos_id()
                                                           : tokenizer.token_id(p.text);
      const std::string name = p.kind == ChatPiece::Kind::kBos   ? "BOS"
                               : p.kind == ChatPiece::Kind::kEos ? "EOS"
                                                                 : "'" + p.text + "'";
      MOLE_CHECK(id >= 0, where, ": the chat template writes the special token ", name,
                 ", which the tokenizer does not have (is data.template the model's family?)");
      push(id, p.target);
      ++i;
      continue;
    }
    // The text up to the next special token, encoded as one string; segments: where the target
    // flag changes (byte offset, flag).
    std::string run;
    std::vector<std::pair<size_t, bool>> segments;
    for (; i < pieces.size() && pieces[i].kind == ChatPiece::Kind::kText; ++i) {
      if (segments.empty() || segments.back().second != pieces[i].target) {
        segments.emplace_back(run.size(), pieces[i].target);
      }
      run += pieces[i].text;
    }
    const std::vector<int64_t> ids = tokenizer.encode(run);
    // Segment k starts at the first token that differs from the encoding of the text before it.
    std::vector<size_t> starts{0};
    for (size_t k = 1; k < segments.size(); ++k) {
      const std::vector<int64_t> before = tokenizer.encode(run.substr(0, segments[k].first));
      size_t common = 0;
      while (common < before.size() && common < ids.size() && before[common] == ids[common]) ++common;
      starts.push_back(std::max(starts.back(), common));
    }
    starts.push_back(ids.size());
    for (size_t k = 0; k < segments.size(); ++k) {
      for (size_t t = starts[k]; t < starts[k + 1]; ++t) push(ids[t], segments[k].second);
    }
  }
  return e;
}

}  // namespace mole::launch
