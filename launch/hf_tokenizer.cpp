// The tokenizer.json interpreter (see hf_tokenizer.h). Text flows as in Hugging Face's library:
// added tokens are cut out of the raw text; each remaining segment is normalised, pre-tokenised
// into pieces, and each piece is encoded by the BPE model (cached per piece); the post-processor
// adds special tokens. Decoding maps ids to token strings and runs the decoder chain over them.
#include "launch/hf_tokenizer.h"

#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/regex.h>
#include <unicode/unistr.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <queue>
#include <unordered_map>

#include "kernels/check.h"

namespace mole::launch {
namespace {

using json = nlohmann::json;

// --- UTF-8 -------------------------------------------------------------------------------------

// The code points of `s`, each as its UTF-8 bytes (invalid bytes one by one).
std::vector<std::string> utf8_chars(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
    if (i + n > s.size()) n = 1;
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

std::string to_utf8(const icu::UnicodeString& u) {
  std::string out;
  u.toUTF8String(out);
  return out;
}

icu::UnicodeString from_utf8(const std::string& s) { return icu::UnicodeString::fromUTF8(icu::StringPiece(s)); }

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Bytes as text, each invalid UTF-8 sequence replaced by U+FFFD (Rust's from_utf8_lossy: one
// replacement per maximal invalid prefix).
std::string utf8_lossy(const std::string& bytes) {
  std::string out;
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    size_t need = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c == 0xE0) need = 2, lo = 0xA0;
    else if (c >= 0xE1 && c <= 0xEC) need = 2;
    else if (c == 0xED) need = 2, hi = 0x9F;
    else if (c >= 0xEE && c <= 0xEF) need = 2;
    else if (c == 0xF0) need = 3, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3) need = 3;
    else if (c == 0xF4) need = 3, hi = 0x8F;
    if (need == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
      continue;
    }
    size_t k = 1;
    for (; k <= need && i + k < n; ++k) {
      const unsigned char t = s[i + k];
      const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
      if (t < l || t > h) break;
    }
    if (k == need + 1) {
      out.append(bytes, i, need + 1);
      i += need + 1;
    } else {
      out += "\xEF\xBF\xBD";
      i += k;
    }
  }
  return out;
}

// GPT-2's byte <-> printable character table (ByteLevel).
struct ByteTable {
  std::string byte_char[256];
  std::unordered_map<std::string, unsigned char> char_byte;
  ByteTable() {
    std::vector<int> bs;
    for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
    for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
    for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
    std::vector<int> cs = bs;
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      if (std::find(bs.begin(), bs.end(), b) == bs.end()) {
        bs.push_back(b);
        cs.push_back(256 + n++);
      }
    }
    for (size_t i = 0; i < bs.size(); ++i) {
      std::string ch;
      append_utf8(ch, static_cast<uint32_t>(cs[i]));
      byte_char[bs[i]] = ch;
      char_byte[ch] = static_cast<unsigned char>(bs[i]);
    }
  }
};
const ByteTable& byte_table() {
  static const ByteTable table;
  return table;
}

// --- regular expressions -------------------------------------------------------------------------

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    UErrorCode status = U_ZERO_ERROR;
    UParseError parse;
    const icu::UnicodeString u = from_utf8(pattern);
    pattern_.reset(icu::RegexPattern::compile(u, 0, parse, status));
    MOLE_CHECK(U_SUCCESS(status) && pattern_, where, ": the regular expression '", pattern,
               "' does not compile (ICU: ", u_errorName(status), " at offset ", parse.offset, ")");
  }
  // [begin, end) byte ranges of the matches in `text`, left to right.
  std::vector<std::pair<size_t, size_t>> matches(const std::string& text) const {
    const icu::UnicodeString u = from_utf8(text);
    UErrorCode status = U_ZERO_ERROR;
    std::unique_ptr<icu::RegexMatcher> m(pattern_->matcher(u, status));
    MOLE_CHECK(U_SUCCESS(status), "regex matcher: ", u_errorName(status));
    // UTF-16 offset -> UTF-8 offset.
    std::vector<size_t> byte_at(static_cast<size_t>(u.length()) + 1, 0);
    {
      size_t bytes = 0;
      int32_t i = 0;
      while (i < u.length()) {
        const UChar32 c = u.char32At(i);
        const int32_t units = U16_LENGTH(c);
        const size_t len = c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
        for (int32_t k = 0; k < units; ++k) byte_at[static_cast<size_t>(i + k)] = bytes;
        bytes += len;
        i += units;
      }
      byte_at[static_cast<size_t>(u.length())] = bytes;
    }
    std::vector<std::pair<size_t, size_t>> out;
    while (m->find(status) && U_SUCCESS(status)) {
      const int32_t s = m->start(status), e = m->end(status);
      if (e > s) out.emplace_back(byte_at[static_cast<size_t>(s)], byte_at[static_cast<size_t>(e)]);
    }
    return out;
  }
  std::string replace_all(const std::string& text, const std::string& content) const {
    UErrorCode status = U_ZERO_ERROR;
    std::unique_ptr<icu::RegexMatcher> m(pattern_->matcher(from_utf8(text), status));
    // The replacement is literal text: escape ICU's $ and backslash.
    std::string literal;
    for (char c : content) {
      if (c == '$' || c == '\\') literal += '\\';
      literal += c;
    }
    const icu::UnicodeString out = m->replaceAll(from_utf8(literal), status);
    MOLE_CHECK(U_SUCCESS(status), "regex replace: ", u_errorName(status));
    return to_utf8(out);
  }

 private:
  std::unique_ptr<icu::RegexPattern> pattern_;
};

std::string quote_meta(const std::string& s) {
  std::string out = "\\Q";
  for (size_t i = 0; i < s.size(); ++i) {
    if (s.compare(i, 2, "\\E") == 0) {
      out += "\\E\\\\E\\Q";
      ++i;
    } else {
      out += s[i];
    }
  }
  return out + "\\E";
}

// A pattern object {"String": ...} or {"Regex": ...} as a Regex.
Regex pattern_regex(const json& p, const std::string& where) {
  MOLE_CHECK(p.is_object(), where, ": pattern must be {\"String\": ...} or {\"Regex\": ...}");
  if (p.contains("String")) return Regex(quote_meta(p.at("String").get<std::string>()), where);
  MOLE_CHECK(p.contains("Regex"), where, ": pattern must be {\"String\": ...} or {\"Regex\": ...}");
  return Regex(p.at("Regex").get<std::string>(), where);
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  if (from.empty()) return s;
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) {
    s.replace(at, from.size(), to);
  }
  return s;
}

// --- normalizers ----------------------------------------------------------------------------------

using Normalizer = std::function<std::string(const std::string&)>;

Normalizer make_normalizer(const json& n, const std::string& file) {
  if (n.is_null()) return [](const std::string& s) { return s; };
  const std::string type = n.value("type", "");
  const std::string where = file + ": normalizer " + type;
  if (type == "Sequence") {
    std::vector<Normalizer> parts;
    for (const json& p : n.at("normalizers")) parts.push_back(make_normalizer(p, file));
    return [parts](const std::string& s) {
      std::string out = s;
      for (const Normalizer& p : parts) out = p(out);
      return out;
    };
  }
  if (type == "NFC" || type == "NFKC" || type == "NFD" || type == "NFKD") {
    UErrorCode status = U_ZERO_ERROR;
    const icu::Normalizer2* norm = type == "NFC"    ? icu::Normalizer2::getNFCInstance(status)
                                   : type == "NFKC" ? icu::Normalizer2::getNFKCInstance(status)
                                   : type == "NFD"  ? icu::Normalizer2::getNFDInstance(status)
                                                    : icu::Normalizer2::getNFKDInstance(status);
    MOLE_CHECK(U_SUCCESS(status), where, ": ICU has no such normalizer (", u_errorName(status), ")");
    return [norm](const std::string& s) {
      UErrorCode st = U_ZERO_ERROR;
      const icu::UnicodeString out = norm->normalize(from_utf8(s), st);
      MOLE_CHECK(U_SUCCESS(st), "normalization failed: ", u_errorName(st));
      return to_utf8(out);
    };
  }
  if (type == "Lowercase") {
    return [](const std::string& s) { return to_utf8(from_utf8(s).toLower(icu::Locale::getRoot())); };
  }
  if (type == "Prepend") {
    const std::string prepend = n.at("prepend").get<std::string>();
    return [prepend](const std::string& s) { return s.empty() ? s : prepend + s; };
  }
  if (type == "Replace") {
    const std::string content = n.at("content").get<std::string>();
    const json& p = n.at("pattern");
    if (p.contains("String")) {
      const std::string from = p.at("String").get<std::string>();
      return [from, content](const std::string& s) { return replace_all(s, from, content); };
    }
    auto re = std::make_shared<Regex>(pattern_regex(p, where));
    return [re, content](const std::string& s) { return re->replace_all(s, content); };
  }
  MOLE_FAIL(file, ": unsupported normalizer '", type,
            "' (supported: NFC, NFKC, NFD, NFKD, Lowercase, Prepend, Replace, Sequence)");
}

// --- pre-tokenizers -------------------------------------------------------------------------------

struct Piece {
  std::string text;
  bool first = false;  // the segment's first piece (Metaspace's prepend_scheme "first")
};
using PreTokenizer = std::function<std::vector<Piece>(std::vector<Piece>)>;

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

Behavior parse_behavior(const std::string& b, const std::string& where) {
  if (b == "Removed") return Behavior::kRemoved;
  if (b == "Isolated") return Behavior::kIsolated;
  if (b == "MergedWithPrevious") return Behavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::kMergedWithNext;
  if (b == "Contiguous") return Behavior::kContiguous;
  MOLE_FAIL(where, ": unknown split behavior '", b,
            "' (allowed: Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous)");
}

// Splits `text` at the matches, as the library's NormalizedString::split.
std::vector<std::string> split_by(const std::string& text, const std::vector<std::pair<size_t, size_t>>& found,
                                  Behavior behavior, bool invert) {
  std::vector<std::pair<std::string, bool>> parts;  // (text, is a match)
  size_t at = 0;
  for (const auto& [b, e] : found) {
    if (b > at) parts.emplace_back(text.substr(at, b - at), invert);
    parts.emplace_back(text.substr(b, e - b), !invert);
    at = e;
  }
  if (at < text.size()) parts.emplace_back(text.substr(at), invert);
  std::vector<std::string> out;
  switch (behavior) {
    case Behavior::kRemoved:
      for (const auto& [t, m] : parts) if (!m) out.push_back(t);
      break;
    case Behavior::kIsolated:
      for (const auto& [t, m] : parts) out.push_back(t);
      break;
    case Behavior::kContiguous: {
      bool last_match = false;
      for (const auto& [t, m] : parts) {
        if (m && last_match && !out.empty()) out.back() += t;
        else out.push_back(t);
        last_match = m;
      }
      break;
    }
    case Behavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const auto& [t, m] : parts) {
        if (m && !previous_match && !out.empty()) out.back() += t;
        else out.push_back(t);
        previous_match = m;
      }
      break;
    }
    case Behavior::kMergedWithNext: {
      bool previous_match = false;
      for (const auto& [t, m] : parts) {
        if (previous_match && !m && !out.empty()) out.back() += t;
        else out.push_back(t);
        previous_match = m;
      }
      break;
    }
  }
  out.erase(std::remove_if(out.begin(), out.end(), [](const std::string& s) { return s.empty(); }), out.end());
  return out;
}

PreTokenizer split_each(std::function<std::vector<std::string>(const std::string&)> fn) {
  return [fn](std::vector<Piece> pieces) {
    std::vector<Piece> out;
    for (const Piece& p : pieces) {
      bool first = p.first;
      for (std::string& t : fn(p.text)) {
        out.push_back({std::move(t), first});
        first = false;
      }
    }
    return out;
  };
}

const char* kGpt2Regex = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

PreTokenizer make_pre_tokenizer(const json& p, const std::string& file) {
  if (p.is_null()) return [](std::vector<Piece> pieces) { return pieces; };
  const std::string type = p.value("type", "");
  const std::string where = file + ": pre-tokenizer " + type;
  if (type == "Sequence") {
    std::vector<PreTokenizer> parts;
    for (const json& q : p.at("pretokenizers")) parts.push_back(make_pre_tokenizer(q, file));
    return [parts](std::vector<Piece> pieces) {
      for (const PreTokenizer& q : parts) pieces = q(std::move(pieces));
      return pieces;
    };
  }
  if (type == "Split") {
    auto re = std::make_shared<Regex>(pattern_regex(p.at("pattern"), where));
    const Behavior behavior = parse_behavior(p.at("behavior").get<std::string>(), where);
    const bool invert = p.value("invert", false);
    return split_each([re, behavior, invert](const std::string& s) {
      return split_by(s, re->matches(s), behavior, invert);
    });
  }
  if (type == "ByteLevel") {
    const bool prefix = p.value("add_prefix_space", false);
    const bool use_regex = p.value("use_regex", true);
    auto re = std::make_shared<Regex>(kGpt2Regex, where);
    return split_each([prefix, use_regex, re](const std::string& s) {
      std::string t = prefix && (s.empty() || s[0] != ' ') ? " " + s : s;
      std::vector<std::string> parts =
          use_regex ? split_by(t, re->matches(t), Behavior::kIsolated, false) : std::vector<std::string>{t};
      for (std::string& part : parts) {
        std::string mapped;
        for (unsigned char c : part) mapped += byte_table().byte_char[c];
        part = std::move(mapped);
      }
      return parts;
    });
  }
  if (type == "Metaspace") {
    const std::string replacement = p.value("replacement", std::string("\xE2\x96\x81"));
    std::string scheme = p.value("prepend_scheme", std::string());
    if (scheme.empty()) scheme = p.value("add_prefix_space", true) ? "always" : "never";
    MOLE_CHECK(scheme == "always" || scheme == "first" || scheme == "never", where, ": unknown prepend_scheme '",
               scheme, "' (allowed: always, first, never)");
    const bool split = p.value("split", true);
    return [replacement, scheme, split](std::vector<Piece> pieces) {
      std::vector<Piece> out;
      for (const Piece& piece : pieces) {
        std::string t = replace_all(piece.text, " ", replacement);
        const bool prepend = scheme == "always" || (scheme == "first" && piece.first);
        if (prepend && t.compare(0, replacement.size(), replacement) != 0) t = replacement + t;
        if (!split) {
          out.push_back({t, piece.first});
          continue;
        }
        // Each replacement starts a piece (MergedWithNext).
        std::vector<std::pair<size_t, size_t>> found;
        for (size_t at = t.find(replacement); at != std::string::npos; at = t.find(replacement, at + replacement.size())) {
          found.emplace_back(at, at + replacement.size());
        }
        bool first = piece.first;
        for (std::string& s : split_by(t, found, Behavior::kMergedWithNext, false)) {
          out.push_back({std::move(s), first});
          first = false;
        }
      }
      return out;
    };
  }
  if (type == "Digits") {
    const bool individual = p.value("individual_digits", false);
    auto re = std::make_shared<Regex>(individual ? "\\p{N}" : "\\p{N}+", where);
    return split_each([re](const std::string& s) { return split_by(s, re->matches(s), Behavior::kIsolated, false); });
  }
  if (type == "Whitespace") {
    auto re = std::make_shared<Regex>("\\w+|[^\\w\\s]+", where);
    return split_each([re](const std::string& s) { return split_by(s, re->matches(s), Behavior::kRemoved, true); });
  }
  MOLE_FAIL(file, ": unsupported pre-tokenizer '", type,
            "' (supported: Split, ByteLevel, Metaspace, Digits, Whitespace, Sequence)");
}

// --- decoders -------------------------------------------------------------------------------------

using Decoder = std::function<std::vector<std::string>(std::vector<std::string>)>;

// "<0xAB>" -> 0xAB, or -1.
int byte_token(const std::string& t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
  int v = 0;
  for (size_t i = 3; i < 5; ++i) {
    const char c = t[i];
    const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (d < 0) return -1;
    v = v * 16 + d;
  }
  return v;
}

Decoder make_decoder(const json& d, const std::string& file) {
  if (d.is_null()) return [](std::vector<std::string> t) { return t; };
  const std::string type = d.value("type", "");
  const std::string where = file + ": decoder " + type;
  if (type == "Sequence") {
    std::vector<Decoder> parts;
    for (const json& q : d.at("decoders")) parts.push_back(make_decoder(q, file));
    return [parts](std::vector<std::string> t) {
      for (const Decoder& q : parts) t = q(std::move(t));
      return t;
    };
  }
  if (type == "ByteLevel") {
    return [](std::vector<std::string> tokens) {
      std::string bytes;
      for (const std::string& t : tokens) {
        std::string mine;
        bool all = true;
        for (const std::string& ch : utf8_chars(t)) {
          auto it = byte_table().char_byte.find(ch);
          if (it == byte_table().char_byte.end()) {
            all = false;
            break;
          }
          mine += static_cast<char>(it->second);
        }
        bytes += all ? mine : t;
      }
      return std::vector<std::string>{utf8_lossy(bytes)};
    };
  }
  if (type == "ByteFallback") {
    return [](std::vector<std::string> tokens) {
      std::vector<std::string> out;
      std::string pending;
      size_t pending_count = 0;
      const auto flush = [&]() {
        if (pending_count == 0) return;
        if (utf8_lossy(pending) == pending) {
          out.push_back(pending);
        } else {
          for (size_t i = 0; i < pending_count; ++i) out.emplace_back("\xEF\xBF\xBD");
        }
        pending.clear();
        pending_count = 0;
      };
      for (std::string& t : tokens) {
        const int b = byte_token(t);
        if (b >= 0) {
          pending += static_cast<char>(b);
          ++pending_count;
        } else {
          flush();
          out.push_back(std::move(t));
        }
      }
      flush();
      return out;
    };
  }
  if (type == "Fuse") {
    return [](std::vector<std::string> tokens) {
      std::string all;
      for (const std::string& t : tokens) all += t;
      return std::vector<std::string>{all};
    };
  }
  if (type == "Strip") {
    const std::string content = d.at("content").get<std::string>();
    const int64_t start = d.value("start", int64_t{0}), stop = d.value("stop", int64_t{0});
    return [content, start, stop](std::vector<std::string> tokens) {
      for (std::string& t : tokens) {
        std::vector<std::string> chars = utf8_chars(t);
        size_t b = 0, e = chars.size();
        for (int64_t i = 0; i < start && b < e && chars[b] == content; ++i) ++b;
        for (int64_t i = 0; i < stop && e > b && chars[e - 1] == content; ++i) --e;
        std::string s;
        for (size_t i = b; i < e; ++i) s += chars[i];
        t = s;
      }
      return tokens;
    };
  }
  if (type == "Replace") {
    const std::string content = d.at("content").get<std::string>();
    const json& p = d.at("pattern");
    MOLE_CHECK(p.contains("String"), where, ": only {\"String\": ...} patterns are supported in decoders");
    const std::string from = p.at("String").get<std::string>();
    return [from, content](std::vector<std::string> tokens) {
      for (std::string& t : tokens) t = replace_all(t, from, content);
      return tokens;
    };
  }
  if (type == "Metaspace") {
    const std::string replacement = d.value("replacement", std::string("\xE2\x96\x81"));
    std::string scheme = d.value("prepend_scheme", std::string());
    if (scheme.empty()) scheme = d.value("add_prefix_space", true) ? "always" : "never";
    return [replacement, scheme](std::vector<std::string> tokens) {
      // As the library does: every replacement character of the first token is dropped (not
      // only a leading one) unless the scheme is "never"; elsewhere each becomes a space.
      for (size_t i = 0; i < tokens.size(); ++i) {
        tokens[i] = replace_all(tokens[i], replacement, i == 0 && scheme != "never" ? "" : " ");
      }
      return tokens;
    };
  }
  MOLE_FAIL(file, ": unsupported decoder '", type,
            "' (supported: ByteLevel, Metaspace, ByteFallback, Fuse, Strip, Replace, Sequence)");
}

struct AddedToken {
  std::string content;
  int64_t id = 0;
  bool special = false;
  bool lstrip = false, rstrip = false, single_word = false;
};

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
bool is_word(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || (c & 0x80); }

}  // namespace

struct HfTokenizer::Impl {
  std::string file;
  Normalizer normalizer;
  PreTokenizer pre_tokenizer;
  Decoder decoder;
  std::unordered_map<std::string, int64_t> vocab;
  std::unordered_map<int64_t, std::string> id_to_token;
  std::unordered_map<std::string, int64_t> merge_rank;  // "a b" -> rank
  bool ignore_merges = false, byte_fallback = false, fuse_unk = false;
  int64_t unk = -1;
  std::vector<AddedToken> added;
  std::map<unsigned char, std::vector<size_t>> added_by_first;  // first byte -> added, longest first
  std::vector<std::vector<int64_t>> template_single;  // per item: fixed ids, or empty = the sequence
  std::vector<bool> template_is_sequence;
  int64_t vocab_size = 0, bos = -1, eos = -1, pad = -1;
  // Word -> ids, in shards so that threads tokenising a dataset seldom wait for each other.
  struct CacheShard {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<int64_t>> words;
  };
  static constexpr size_t kCacheShards = 16;
  mutable std::array<CacheShard, kCacheShards> cache;

  std::vector<int64_t> bpe(const std::string& word) const {
    CacheShard& shard = cache[std::hash<std::string>{}(word) % kCacheShards];
    {
      std::lock_guard<std::mutex> lock(shard.mutex);
      auto it = shard.words.find(word);
      if (it != shard.words.end()) return it->second;
    }
    std::vector<int64_t> ids;
    auto whole = vocab.find(word);
    if (ignore_merges && whole != vocab.end()) {
      ids.push_back(whole->second);
    } else {
      // Symbols: the word's characters (a character outside the vocabulary becomes its byte
      // tokens with byte_fallback, else unk).
      std::vector<std::string> symbols;
      for (const std::string& ch : utf8_chars(word)) {
        if (vocab.count(ch)) {
          symbols.push_back(ch);
        } else if (byte_fallback) {
          bool all = true;
          std::vector<std::string> bytes;
          for (unsigned char b : ch) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "<0x%02X>", b);
            bytes.emplace_back(buf);
            all = all && vocab.count(bytes.back());
          }
          if (all) symbols.insert(symbols.end(), bytes.begin(), bytes.end());
          else symbols.push_back("\x01unk");
        } else {
          symbols.push_back("\x01unk");
        }
      }
      // Merge the best-ranked adjacent pair (leftmost first among equals) until none is left, as
      // the library does: a heap of candidate pairs over a linked list of symbols, a candidate
      // dropped when either side has changed since it was pushed.
      const size_t n = symbols.size();
      std::vector<int64_t> prev(n), next(n), version(n, 0);
      std::vector<bool> alive(n, true);
      for (size_t i = 0; i < n; ++i) {
        prev[i] = static_cast<int64_t>(i) - 1;
        next[i] = i + 1 < n ? static_cast<int64_t>(i + 1) : -1;
      }
      struct Candidate {
        int64_t rank, left, left_version, right_version;
        bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
      };
      std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
      const auto push = [&](int64_t left) {
        if (left < 0 || next[left] < 0) return;
        const int64_t right = next[left];
        auto it = merge_rank.find(symbols[left] + " " + symbols[right]);
        if (it != merge_rank.end()) heap.push({it->second, left, version[left], version[right]});
      };
      for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int64_t>(i));
      while (!heap.empty()) {
        const Candidate c = heap.top();
        heap.pop();
        const int64_t right = next[c.left];
        if (!alive[c.left] || right < 0 || version[c.left] != c.left_version || version[right] != c.right_version) {
          continue;
        }
        symbols[c.left] += symbols[right];
        alive[right] = false;
        ++version[c.left];
        next[c.left] = next[right];
        if (next[right] >= 0) prev[next[right]] = c.left;
        push(prev[c.left]);
        push(c.left);
      }
      std::vector<std::string> merged;
      for (int64_t i = 0; i >= 0 && i < static_cast<int64_t>(n); i = next[i]) merged.push_back(std::move(symbols[i]));
      symbols = std::move(merged);
      for (const std::string& s : symbols) {
        if (s == "\x01unk") {
          MOLE_CHECK(unk >= 0, file, ": '", word, "' has a character outside the vocabulary and the model has no unk_token");
          if (!(fuse_unk && !ids.empty() && ids.back() == unk)) ids.push_back(unk);
          continue;
        }
        auto it = vocab.find(s);
        MOLE_CHECK(it != vocab.end(), file, ": merge result '", s, "' is not in the vocabulary");
        ids.push_back(it->second);
      }
    }
    std::lock_guard<std::mutex> lock(shard.mutex);
    if (word.size() <= 256 && shard.words.size() < (1u << 16)) shard.words.emplace(word, ids);
    return ids;
  }

  // `at_start`: the segment begins the input (Metaspace's prepend_scheme "first" prepends only
  // there, not after an added token, as the library decides by the segment's original offset).
  void encode_segment(const std::string& text, bool at_start, std::vector<int64_t>& out) const {
    if (text.empty()) return;
    const std::string normalized = normalizer(text);
    if (normalized.empty()) return;
    for (const Piece& p : pre_tokenizer({Piece{normalized, at_start}})) {
      const std::vector<int64_t> ids = bpe(p.text);
      out.insert(out.end(), ids.begin(), ids.end());
    }
  }

  std::vector<int64_t> encode(const std::string& text) const {
    std::vector<int64_t> out;
    size_t segment = 0, i = 0;
    while (i < text.size()) {
      const AddedToken* hit = nullptr;
      auto bucket = added_by_first.find(static_cast<unsigned char>(text[i]));
      if (bucket != added_by_first.end()) {
        for (size_t k : bucket->second) {
          const AddedToken& t = added[k];
          if (text.compare(i, t.content.size(), t.content) != 0) continue;
          if (t.single_word) {
            const bool before_ok = i == 0 || !is_word(text[i - 1]);
            const size_t end = i + t.content.size();
            const bool after_ok = end >= text.size() || !is_word(text[end]);
            if (!before_ok || !after_ok) continue;
          }
          hit = &t;
          break;
        }
      }
      if (!hit) {
        ++i;
        continue;
      }
      size_t left = i, right = i + hit->content.size();
      if (hit->lstrip) while (left > segment && is_space(text[left - 1])) --left;
      if (hit->rstrip) while (right < text.size() && is_space(text[right])) ++right;
      encode_segment(text.substr(segment, left - segment), segment == 0, out);
      out.push_back(hit->id);
      segment = i = right;
    }
    encode_segment(text.substr(segment), segment == 0, out);
    return out;
  }
};

HfTokenizer::HfTokenizer(const std::string& path) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.file = path;
  std::ifstream in(path, std::ios::binary);
  MOLE_CHECK(in.good(), "tokenizer: cannot open '", path, "'");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    MOLE_FAIL("tokenizer '", path, "' is not valid JSON: ", e.what());
  }
  try {
    const json& model = j.at("model");
    const std::string type = model.value("type", "");
    MOLE_CHECK(type == "BPE", path, ": unsupported model '", type, "' (supported: BPE)");
    MOLE_CHECK(model.value("continuing_subword_prefix", json()).is_null() &&
                   model.value("end_of_word_suffix", json()).is_null(),
               path, ": BPE continuing_subword_prefix / end_of_word_suffix are not supported");
    MOLE_CHECK(model.value("dropout", json()).is_null(), path, ": BPE dropout is not supported");
    for (const auto& [token, id] : model.at("vocab").items()) {
      m.vocab.emplace(token, id.get<int64_t>());
      m.id_to_token.emplace(id.get<int64_t>(), token);
      m.vocab_size = std::max(m.vocab_size, id.get<int64_t>() + 1);
    }
    int64_t rank = 0;
    for (const json& merge : model.at("merges")) {
      std::string key;
      if (merge.is_string()) {
        key = merge.get<std::string>();
      } else {
        MOLE_CHECK(merge.is_array() && merge.size() == 2, path, ": a merge must be \"a b\" or [\"a\", \"b\"]");
        key = merge[0].get<std::string>() + " " + merge[1].get<std::string>();
      }
      m.merge_rank.emplace(key, rank++);
    }
    m.ignore_merges = model.value("ignore_merges", false);
    m.byte_fallback = model.value("byte_fallback", false);
    m.fuse_unk = model.value("fuse_unk", false);
    if (model.contains("unk_token") && model.at("unk_token").is_string()) {
      auto it = m.vocab.find(model.at("unk_token").get<std::string>());
      MOLE_CHECK(it != m.vocab.end(), path, ": unk_token is not in the vocabulary");
      m.unk = it->second;
    }
    for (const json& a : j.value("added_tokens", json::array())) {
      AddedToken t;
      t.content = a.at("content").get<std::string>();
      t.id = a.at("id").get<int64_t>();
      t.special = a.value("special", false);
      t.lstrip = a.value("lstrip", false);
      t.rstrip = a.value("rstrip", false);
      t.single_word = a.value("single_word", false);
      MOLE_CHECK(!t.content.empty(), path, ": an added token is empty");
      m.id_to_token[t.id] = t.content;
      m.vocab_size = std::max(m.vocab_size, t.id + 1);
      m.added.push_back(t);
    }
    for (size_t k = 0; k < m.added.size(); ++k) {
      m.added_by_first[static_cast<unsigned char>(m.added[k].content[0])].push_back(k);
    }
    for (auto& [first, list] : m.added_by_first) {
      std::stable_sort(list.begin(), list.end(), [&](size_t a, size_t b) {
        return m.added[a].content.size() > m.added[b].content.size();
      });
    }
    m.normalizer = make_normalizer(j.value("normalizer", json()), path);
    m.pre_tokenizer = make_pre_tokenizer(j.value("pre_tokenizer", json()), path);
    m.decoder = make_decoder(j.value("decoder", json()), path);
    // The post-processor: which ids surround a single sequence.
    std::function<void(const json&)> post = [&](const json& p) {
      if (p.is_null()) return;
      const std::string ptype = p.value("type", "");
      if (ptype == "Sequence") {
        for (const json& q : p.at("processors")) post(q);
      } else if (ptype == "TemplateProcessing") {
        m.template_single.clear();
        m.template_is_sequence.clear();
        for (const json& item : p.at("single")) {
          if (item.contains("Sequence")) {
            m.template_single.emplace_back();
            m.template_is_sequence.push_back(true);
          } else {
            const std::string name = item.at("SpecialToken").at("id").get<std::string>();
            const json& special = p.at("special_tokens").at(name);
            m.template_single.push_back(special.at("ids").get<std::vector<int64_t>>());
            m.template_is_sequence.push_back(false);
          }
        }
      } else if (ptype != "ByteLevel") {
        MOLE_FAIL(path, ": unsupported post-processor '", ptype, "' (supported: TemplateProcessing, ByteLevel, Sequence)");
      }
    };
    post(j.value("post_processor", json()));
  } catch (const json::exception& e) {
    MOLE_FAIL("tokenizer '", path, "': ", e.what());
  }
  // bos / eos / pad: the folder's tokenizer_config.json, else the template's first special token.
  const auto config_path = std::filesystem::path(path).parent_path() / "tokenizer_config.json";
  std::optional<json> config;
  if (std::filesystem::is_regular_file(config_path)) {
    std::ifstream cin(config_path);
    try {
      config = json::parse(cin);
    } catch (const json::exception& e) {
      MOLE_FAIL("'", config_path.string(), "' is not valid JSON: ", e.what());
    }
  }
  const auto config_token = [&](const char* key) -> int64_t {
    if (!config || !config->contains(key)) return -1;
    const json& v = config->at(key);
    const std::string name = v.is_string() ? v.get<std::string>() : v.is_object() ? v.value("content", "") : "";
    return name.empty() ? -1 : token_id(name);
  };
  m.bos = config_token("bos_token");
  m.eos = config_token("eos_token");
  m.pad = config_token("pad_token");
  if (m.bos < 0) {
    for (size_t i = 0; i < m.template_single.size(); ++i) {
      if (!m.template_is_sequence[i] && !m.template_single[i].empty()) {
        m.bos = m.template_single[i].front();
        break;
      }
      if (m.template_is_sequence[i]) break;
    }
  }
  if (m.pad < 0) m.pad = m.eos >= 0 ? m.eos : 0;
}

HfTokenizer::~HfTokenizer() = default;

std::vector<int64_t> HfTokenizer::encode(const std::string& text) const { return impl_->encode(text); }

std::vector<int64_t> HfTokenizer::encode_with_special(const std::string& text) const {
  const std::vector<int64_t> ids = impl_->encode(text);
  if (impl_->template_single.empty()) return ids;
  std::vector<int64_t> out;
  for (size_t i = 0; i < impl_->template_single.size(); ++i) {
    const std::vector<int64_t>& part = impl_->template_is_sequence[i] ? ids : impl_->template_single[i];
    out.insert(out.end(), part.begin(), part.end());
  }
  return out;
}

std::string HfTokenizer::decode(const std::vector<int64_t>& ids) const {
  std::vector<std::string> tokens;
  for (int64_t id : ids) {
    auto it = impl_->id_to_token.find(id);
    MOLE_CHECK(it != impl_->id_to_token.end(), "tokenizer '", impl_->file, "': id ", id,
               " is outside the vocabulary [0, ", impl_->vocab_size, ")");
    tokens.push_back(it->second);
  }
  std::string out;
  for (const std::string& t : impl_->decoder(std::move(tokens))) out += t;
  return out;
}

int64_t HfTokenizer::vocab_size() const { return impl_->vocab_size; }
int64_t HfTokenizer::bos_id() const { return impl_->bos; }
int64_t HfTokenizer::eos_id() const { return impl_->eos; }
int64_t HfTokenizer::pad_id() const { return impl_->pad; }

int64_t HfTokenizer::token_id(const std::string& token) const {
  for (const AddedToken& t : impl_->added) {
    if (t.content == token) return t.id;
  }
  auto it = impl_->vocab.find(token);
  return it == impl_->vocab.end() ? -1 : it->second;
}

}  // namespace mole::launch
