// Tokenizers behind make_tokenizer(): the byte-level demo tokenizer, and sentencepiece BPE models
// (LLaMA-style tokenizer.model) read and applied here, following SentencePieceProcessor.
//
// libsentencepiece is not used: Debian's build bundles protobuf-lite 3.14 and exports its symbols,
// LibTorch loads libprotobuf 3.21, whose symbols win, and loading any model then aborts in
// protobuf's version check (dlopen with RTLD_DEEPBIND is no way out: it breaks on the libstdc++
// objects the executable copy-relocates, such as std::cerr). Supported: BPE models with identity
// normalization (no precompiled character map), byte fallback, user-defined and unused pieces.
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <queue>
#include <string_view>
#include <unordered_map>
#include <unordered_set>

#include <spdlog/spdlog.h>

#include "kernels/check.h"
#include "launch/data.h"
#include "launch/hf_tokenizer.h"

namespace mole::launch {
namespace {

class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int64_t kPad = 0, kBos = 1, kEos = 2, kFirstByte = 3, kVocab = 3 + 256;

  std::vector<int64_t> encode(const std::string& text) const override {
    std::vector<int64_t> ids;
    ids.reserve(text.size());
    for (char c : text) ids.push_back(kFirstByte + static_cast<unsigned char>(c));
    return ids;
  }

  std::string decode(const std::vector<int64_t>& ids) const override {
    std::string text;
    text.reserve(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      const int64_t id = ids[i];
      MOLE_CHECK(id >= 0 && id < kVocab, "byte tokenizer: id ", id, " at index ", i,
                 " is outside the vocabulary [0, ", kVocab, ")");
      if (id >= kFirstByte) text.push_back(static_cast<char>(id - kFirstByte));
    }
    return text;
  }

  int64_t vocab_size() const override { return kVocab; }
  int64_t bos_id() const override { return kBos; }
  int64_t eos_id() const override { return kEos; }
  int64_t pad_id() const override { return kPad; }
};

// ---------------------------------------------------------------- protobuf wire format

// The fields of one protobuf message, decoded just enough to read a ModelProto. As in protobuf,
// the last occurrence of a non-repeated field wins.
class Message {
 public:
  Message(std::string_view data, const std::string& path) : path_(path) {
    size_t pos = 0;
    auto take = [&](uint64_t n) {
      if (n > data.size() - pos) fail("a field runs past the end");
      pos += n;
      return data.substr(pos - n, n);
    };
    auto varint = [&] {
      uint64_t value = 0;
      for (int shift = 0; shift < 64; shift += 7) {
        const auto byte = static_cast<uint8_t>(take(1)[0]);
        value |= static_cast<uint64_t>(byte & 0x7F) << shift;
        if (!(byte & 0x80)) return value;
      }
      fail("a varint is longer than 10 bytes");
    };
    while (pos < data.size()) {
      const uint64_t tag = varint();
      Field field{static_cast<uint32_t>(tag & 7), 0, {}};
      if (field.wire == 0) {
        field.value = varint();
      } else if (field.wire == 2) {
        field.bytes = take(varint());
      } else if (field.wire == 1 || field.wire == 5) {  // little-endian fixed64 / fixed32
        const std::string_view raw = take(field.wire == 1 ? 8 : 4);
        for (size_t i = 0; i < raw.size(); ++i) field.value |= uint64_t(uint8_t(raw[i])) << 8 * i;
      } else {
        fail("unsupported wire type " + std::to_string(field.wire));
      }
      fields_.emplace(static_cast<uint32_t>(tag >> 3), field);
    }
  }

  uint64_t varint(uint32_t number, uint64_t fallback) const {
    const Field* f = last(number, 0);
    return f ? f->value : fallback;
  }
  float fixed32_float(uint32_t number) const {
    const Field* f = last(number, 5);
    const auto bits = static_cast<uint32_t>(f ? f->value : 0);
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
  }
  std::string_view bytes(uint32_t number) const {
    const Field* f = last(number, 2);
    return f ? f->bytes : std::string_view();
  }
  std::vector<std::string_view> repeated_bytes(uint32_t number) const {
    std::vector<std::string_view> out;
    for (auto [it, end] = fields_.equal_range(number); it != end; ++it) {
      check_wire(number, it->second.wire, 2);
      out.push_back(it->second.bytes);
    }
    return out;
  }

 private:
  struct Field {
    uint32_t wire;
    uint64_t value;  // varint and fixed
    std::string_view bytes;
  };

  const Field* last(uint32_t number, uint32_t wire) const {
    const auto [begin, end] = fields_.equal_range(number);
    if (begin == end) return nullptr;
    check_wire(number, std::prev(end)->second.wire, wire);
    return &std::prev(end)->second;
  }
  void check_wire(uint32_t number, uint32_t wire, uint32_t expected) const {
    if (wire != expected) {
      fail("field " + std::to_string(number) + " has wire type " + std::to_string(wire) +
           ", expected " + std::to_string(expected));
    }
  }
  [[noreturn]] void fail(const std::string& what) const {
    MOLE_FAIL("tokenizer: '", path_, "' is not a valid sentencepiece model (", what, ")");
  }

  const std::string& path_;
  std::multimap<uint32_t, Field> fields_;  // equal keys keep their file order
};

// ---------------------------------------------------------------- the model

enum PieceType {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6
};

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";      // U+2581, stands for ' '
constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// The length of the valid UTF-8 character at the start of `s`, 0 when malformed (as
// sentencepiece's DecodeUTF8: no overlong forms, surrogates or code points above U+10FFFF).
size_t utf8_char_length(std::string_view s) {
  const auto b = [&s](size_t i) { return static_cast<uint8_t>(s[i]); };
  const auto trail = [&](size_t i) { return (b(i) & 0xC0) == 0x80; };
  const auto valid = [](uint32_t c) { return c < 0xD800 || (c >= 0xE000 && c <= 0x10FFFF); };
  if (s.empty()) return 0;
  if (b(0) < 0x80) return 1;
  if (s.size() >= 2 && (b(0) & 0xE0) == 0xC0 && trail(1)) {
    return (((b(0) & 0x1Fu) << 6) | (b(1) & 0x3Fu)) >= 0x80 ? 2 : 0;
  }
  if (s.size() >= 3 && (b(0) & 0xF0) == 0xE0 && trail(1) && trail(2)) {
    const uint32_t c = ((b(0) & 0x0Fu) << 12) | ((b(1) & 0x3Fu) << 6) | (b(2) & 0x3Fu);
    return c >= 0x800 && valid(c) ? 3 : 0;
  }
  if (s.size() >= 4 && (b(0) & 0xF8) == 0xF0 && trail(1) && trail(2) && trail(3)) {
    const uint32_t c =
        ((b(0) & 0x07u) << 18) | ((b(1) & 0x3Fu) << 12) | ((b(2) & 0x3Fu) << 6) | (b(3) & 0x3Fu);
    return c >= 0x10000 && valid(c) ? 4 : 0;
  }
  return 0;
}

// sentencepiece's OneCharLen: the character length claimed by the lead byte, clipped to `s`.
size_t lead_byte_length(std::string_view s) {
  static constexpr size_t kByHighNibble[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return std::min(s.size(), kByHighNibble[static_cast<uint8_t>(s[0]) >> 4]);
}

bool starts_with(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

struct EncodedPiece {
  std::string_view text;
  int id;
};

class SentencePieceModel {
 public:
  SentencePieceModel(const std::string& serialized, const std::string& path) : path_(path) {
    const Message model(serialized, path);
    for (std::string_view data : model.repeated_bytes(1)) {
      const Message piece(data, path);
      const uint64_t type = piece.varint(3, kNormal);
      if (type < kNormal || type > kByte) {
        invalid("piece " + std::to_string(pieces_.size()) + " has unknown type " +
                std::to_string(type));
      }
      pieces_.emplace_back(piece.bytes(1));
      scores_.push_back(piece.fixed32_float(2));
      types_.push_back(static_cast<int>(type));
    }
    const Message trainer(model.bytes(2), path);
    auto name = [&trainer](uint32_t number, const char* fallback) {  // empty means the default
      const std::string_view value = trainer.bytes(number);
      return std::string(value.empty() ? fallback : value);
    };
    const uint64_t model_type = trainer.varint(3, 1);  // the proto default: unigram
    byte_fallback_ = trainer.varint(35, 0) != 0;
    unk_surface_ = trainer.bytes(44).empty() ? " \xE2\x81\x87 " : std::string(trainer.bytes(44));
    unk_piece_ = name(45, "<unk>");
    bos_piece_ = name(46, "<s>");
    eos_piece_ = name(47, "</s>");
    pad_piece_ = name(48, "<pad>");
    const Message normalizer(model.bytes(3), path);
    add_dummy_prefix_ = normalizer.varint(3, 1) != 0;
    remove_extra_whitespaces_ = normalizer.varint(4, 1) != 0;
    escape_whitespaces_ = normalizer.varint(5, 1) != 0;
    if (model_type != 2) {
      invalid("model type " + std::to_string(model_type) + (model_type == 1 ? " (unigram)" : "") +
              " is not supported, only BPE (2)");
    }
    if (!normalizer.bytes(2).empty()) {
      invalid("normalizer '" + std::string(normalizer.bytes(1)) +
              "' (a precompiled character map) is not supported, only identity normalization "
              "(as in LLaMA models)");
    }
    if (trainer.varint(24, 0)) invalid("treat_whitespace_as_suffix is not supported");
    index_pieces();
  }
  SentencePieceModel(const SentencePieceModel&) = delete;  // the indexes view into pieces_
  SentencePieceModel& operator=(const SentencePieceModel&) = delete;

  int64_t size() const { return static_cast<int64_t>(pieces_.size()); }
  // -1 when the model has no such piece.
  int find_piece(std::string_view piece) const {
    if (auto it = reserved_.find(piece); it != reserved_.end()) return it->second;
    if (auto it = normal_.find(piece); it != normal_.end()) return it->second;
    return -1;
  }
  int special_id(const std::string& piece, PieceType type) const {
    const int id = piece_to_id(piece);
    return types_[id] == type ? id : -1;
  }
  const std::string& unk_piece() const { return unk_piece_; }
  const std::string& bos_piece() const { return bos_piece_; }
  const std::string& eos_piece() const { return eos_piece_; }
  const std::string& pad_piece() const { return pad_piece_; }

  std::vector<int64_t> encode(std::string_view text) const {
    const std::string normalized = normalize(text);
    std::vector<int64_t> ids;
    bool previous_unknown = false;
    for (const EncodedPiece& p : bpe(normalized)) {
      const bool unknown = types_[p.id] == kUnknown;
      if (unknown && byte_fallback_) {
        for (char c : p.text) ids.push_back(byte_ids_[static_cast<uint8_t>(c)]);
      } else if (!(unknown && previous_unknown)) {  // a run of unknowns is one <unk>
        ids.push_back(p.id);
      }
      previous_unknown = unknown;
    }
    return ids;
  }

  std::string decode(const std::vector<int64_t>& ids) const {
    std::string text, bytes;
    auto flush_bytes = [&] {  // byte pieces spell UTF-8; each malformed byte becomes U+FFFD
      for (std::string_view rest = bytes; !rest.empty();) {
        const size_t n = utf8_char_length(rest);
        text += n ? rest.substr(0, n) : kReplacementChar;
        rest.remove_prefix(n ? n : 1);
      }
      bytes.clear();
    };
    // As SentencePieceProcessor::Decode, the dummy-prefix U+2581 is dropped from the first
    // visible piece; with remove_extra_whitespaces from every piece until text appears.
    bool at_start = true, start_space_dropped = false;
    for (int64_t id : ids) {
      const int type = types_[id];
      if (type == kByte) {
        bytes.push_back(static_cast<char>(byte_of(pieces_[id])));
        continue;
      }
      flush_bytes();
      if (start_space_dropped || !text.empty()) at_start = false;
      start_space_dropped = false;
      if (type == kControl) continue;
      if (type == kUnknown) {
        text += unk_surface_;
        continue;
      }
      std::string_view piece = pieces_[id];
      if (at_start && (add_dummy_prefix_ || remove_extra_whitespaces_) &&
          starts_with(piece, kSpaceSymbol)) {
        piece.remove_prefix(kSpaceSymbol.size());
        start_space_dropped = !remove_extra_whitespaces_;
      }
      for (size_t i = 0; i < piece.size();) {
        const bool space = starts_with(piece.substr(i), kSpaceSymbol);
        text += space ? std::string_view(" ") : piece.substr(i, 1);
        i += space ? kSpaceSymbol.size() : 1;
      }
    }
    flush_bytes();
    return text;
  }

 private:
  [[noreturn]] void invalid(const std::string& what) const {
    MOLE_FAIL("tokenizer: '", path_, "': ", what);
  }

  static int byte_of(const std::string& piece) {  // "<0x4A>" -> 0x4A, else -1
    if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') return -1;
    int value = 0;
    for (char c : piece.substr(3, 2)) {
      const int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
      if (digit < 0) return -1;
      value = value * 16 + digit;
    }
    return value;
  }

  void index_pieces() {
    if (pieces_.empty()) invalid("the model has no pieces");
    std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
    for (size_t i = 0; i < pieces_.size(); ++i) {
      const std::string& piece = pieces_[i];
      const int type = types_[i];
      if (piece.empty()) invalid("piece " + std::to_string(i) + " is empty");
      const bool normal = type == kNormal || type == kUserDefined || type == kUnused;
      if (!(normal ? normal_ : reserved_).emplace(piece, static_cast<int>(i)).second) {
        invalid("piece '" + piece + "' is defined twice");
      }
      if (type == kUserDefined) {
        user_defined_.insert(piece);
        max_user_defined_ = std::max(max_user_defined_, piece.size());
      }
      if (type == kUnknown) {
        if (unk_id_ >= 0) invalid("more than one unknown piece");
        unk_id_ = static_cast<int>(i);
      }
      if (type == kByte) {
        const int byte = byte_of(piece);
        if (!byte_fallback_ || byte < 0) invalid("unexpected byte piece '" + piece + "'");
        byte_ids_[byte] = static_cast<int>(i);
      }
    }
    if (unk_id_ < 0) invalid("the model defines no unknown piece");
    if (byte_fallback_ && std::count(std::begin(byte_ids_), std::end(byte_ids_), -1) > 0) {
      invalid("byte_fallback is set but not all 256 byte pieces exist");
    }
  }

  int piece_to_id(std::string_view piece) const {
    const int id = find_piece(piece);
    return id >= 0 ? id : unk_id_;
  }

  // The longest user-defined piece starting `s` (0 when none); such pieces are never split.
  size_t user_defined_prefix(std::string_view s) const {
    for (size_t n = std::min(s.size(), max_user_defined_); n > 0; --n) {
      if (user_defined_.count(s.substr(0, n))) return n;
    }
    return 0;
  }

  // sentencepiece's Normalizer without a character map: user-defined pieces and valid UTF-8
  // are kept, malformed bytes become U+FFFD, whitespace is escaped to U+2581 and optionally
  // trimmed and collapsed, and a dummy U+2581 may open the text.
  std::string normalize(std::string_view input) const {
    auto next = [this](std::string_view s) -> std::pair<std::string_view, size_t> {
      if (const size_t n = user_defined_prefix(s)) return {s.substr(0, n), n};
      const size_t n = utf8_char_length(s);
      return n ? std::make_pair(s.substr(0, n), n) : std::make_pair(kReplacementChar, size_t{1});
    };
    if (remove_extra_whitespaces_) {
      while (!input.empty() && next(input).first == " ") input.remove_prefix(1);
    }
    std::string out;
    if (input.empty()) return out;
    const std::string_view space = escape_whitespaces_ ? kSpaceSymbol : " ";
    if (add_dummy_prefix_) out += space;
    bool previous_space = remove_extra_whitespaces_;
    while (!input.empty()) {
      auto [piece, consumed] = next(input);
      while (previous_space && starts_with(piece, " ")) piece.remove_prefix(1);
      if (!piece.empty()) {
        for (char c : piece) out += c == ' ' ? space : std::string_view(&c, 1);
        previous_space = piece.back() == ' ';
      }
      input.remove_prefix(consumed);
      if (!remove_extra_whitespaces_) previous_space = false;
    }
    if (remove_extra_whitespaces_) {
      while (out.size() >= space.size() &&
             out.compare(out.size() - space.size(), space.size(), space) == 0) {
        out.resize(out.size() - space.size());
      }
    }
    return out;
  }

  // sentencepiece's bpe::Model::Encode: starting from characters (and whole user-defined
  // pieces), repeatedly merge the adjacent pair that forms the best-scoring piece (leftmost on
  // ties); unused pieces are split back into the pair they were merged from.
  std::vector<EncodedPiece> bpe(std::string_view normalized) const {
    struct Symbol {
      int prev, next;
      bool frozen;
      std::string_view text;
    };
    struct Candidate {
      float score;
      int left, right;
      size_t size;
      bool operator<(const Candidate& o) const {
        return score < o.score || (score == o.score && left > o.left);
      }
    };
    std::vector<Symbol> symbols;
    for (std::string_view rest = normalized; !rest.empty();) {
      const size_t user = user_defined_prefix(rest);
      const size_t n = user ? user : lead_byte_length(rest);
      const int index = static_cast<int>(symbols.size());
      symbols.push_back({index - 1, n < rest.size() ? index + 1 : -1, user > 0, rest.substr(0, n)});
      rest.remove_prefix(n);
    }
    std::priority_queue<Candidate> agenda;
    std::unordered_map<std::string_view, std::pair<std::string_view, std::string_view>> unmerge;
    auto consider = [&](int left, int right) {
      if (left < 0 || right < 0 || symbols[left].frozen || symbols[right].frozen) return;
      const std::string_view merged(symbols[left].text.data(),
                                    symbols[left].text.size() + symbols[right].text.size());
      const auto it = normal_.find(merged);
      if (it == normal_.end()) return;
      agenda.push({scores_[it->second], left, right, merged.size()});
      if (types_[it->second] == kUnused)
        unmerge[merged] = {symbols[left].text, symbols[right].text};
    };
    for (size_t i = 1; i < symbols.size(); ++i)
      consider(static_cast<int>(i) - 1, static_cast<int>(i));
    while (!agenda.empty()) {
      const Candidate top = agenda.top();
      agenda.pop();
      Symbol& left = symbols[top.left];
      Symbol& right = symbols[top.right];
      if (left.text.empty() || right.text.empty() ||
          left.text.size() + right.text.size() != top.size) {
        continue;  // stale: one side has been merged elsewhere since
      }
      left.text = std::string_view(left.text.data(), top.size);
      left.next = right.next;
      if (right.next >= 0) symbols[right.next].prev = top.left;
      right.text = {};
      consider(left.prev, top.left);
      consider(top.left, left.next);
    }
    std::vector<EncodedPiece> out;
    auto emit = [&](auto&& self, std::string_view text) -> void {
      const int id = piece_to_id(text);
      const auto it = unmerge.find(text);
      if (types_[id] != kUnused || it == unmerge.end()) {
        out.push_back({text, id});
        return;
      }
      self(self, it->second.first);
      self(self, it->second.second);
    };
    for (int i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[i].next) emit(emit, symbols[i].text);
    return out;
  }

  std::string path_;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<int> types_;
  std::unordered_map<std::string_view, int> normal_;    // normal, user-defined and unused pieces
  std::unordered_map<std::string_view, int> reserved_;  // control, unknown and byte pieces
  std::unordered_set<std::string_view> user_defined_;
  size_t max_user_defined_ = 0;
  int unk_id_ = -1;
  int byte_ids_[256];
  bool byte_fallback_, add_dummy_prefix_, remove_extra_whitespaces_, escape_whitespaces_;
  std::string unk_surface_, unk_piece_, bos_piece_, eos_piece_, pad_piece_;
};

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(const std::string& serialized, const std::string& path)
      : path_(path), model_(serialized, path) {
    bos_ = model_.special_id(model_.bos_piece(), kControl);
    eos_ = model_.special_id(model_.eos_piece(), kControl);
    // LLaMA-style models define no pad piece. Padding positions are masked out of the loss and
    // attention, so any valid id will do: the unknown piece's (0 in LLaMA).
    pad_ = model_.special_id(model_.pad_piece(), kControl);
    if (pad_ < 0) pad_ = model_.special_id(model_.unk_piece(), kUnknown);
    if (pad_ < 0) pad_ = 0;
  }

  std::vector<int64_t> encode(const std::string& text) const override {
    return model_.encode(text);
  }

  std::string decode(const std::vector<int64_t>& ids) const override {
    for (size_t i = 0; i < ids.size(); ++i) {
      MOLE_CHECK(ids[i] >= 0 && ids[i] < vocab_size(), "tokenizer '", path_, "': id ", ids[i],
                 " at index ", i, " is outside the vocabulary [0, ", vocab_size(), ")");
    }
    return model_.decode(ids);
  }

  int64_t vocab_size() const override { return model_.size(); }
  int64_t token_id(const std::string& token) const override { return model_.find_piece(token); }
  int64_t bos_id() const override { return bos_; }
  int64_t eos_id() const override { return eos_; }
  int64_t pad_id() const override { return pad_; }

 private:
  std::string path_;
  SentencePieceModel model_;
  int64_t bos_ = -1, eos_ = -1, pad_ = 0;
};

}  // namespace

namespace {

constexpr const char* kByteConfig = "tokenizer_config.json";

// The tokenizer_config.json mole writes for the byte tokenizer: its own key, plus the special
// tokens in the transformers spelling for readers that look.
std::string byte_tokenizer_config() {
  return "{\n  \"mole_tokenizer\": \"byte\",\n  \"comment\": \"UTF-8 bytes as ids 3..258, pad 0, bos 1, "
         "eos 2 (mole's byte tokenizer)\",\n  \"pad_token_id\": 0,\n  \"bos_token_id\": 1,\n  "
         "\"eos_token_id\": 2\n}\n";
}

std::string read_file(const std::string& path, const std::string& what) {
  std::ifstream file(path, std::ios::binary);
  MOLE_CHECK(file.is_open(), "tokenizer: cannot open '", path, "' (", what, ")");
  std::string bytes{std::istreambuf_iterator<char>(file), {}};
  MOLE_CHECK(!file.bad(), "tokenizer: error reading '", path, "'");
  return bytes;
}

// A model folder's chat template: chat_template.jinja (what newer transformers versions save), else
// tokenizer_config.json's chat_template, a string or a list of {name, template} (the one named
// "default", as transformers picks; none: no template). "" when there is none.
std::string read_chat_template(const std::filesystem::path& folder) {
  const std::filesystem::path jinja = folder / "chat_template.jinja";
  if (std::filesystem::is_regular_file(jinja)) return read_file(jinja.string(), "chat_template.jinja");
  const std::filesystem::path config_path = folder / "tokenizer_config.json";
  if (!std::filesystem::is_regular_file(config_path)) return {};
  try {
    const nlohmann::json config = nlohmann::json::parse(read_file(config_path.string(), "tokenizer_config.json"));
    if (!config.is_object() || !config.contains("chat_template")) return {};
    const nlohmann::json& t = config.at("chat_template");
    if (t.is_string()) return t.get<std::string>();
    if (t.is_array()) {
      for (const nlohmann::json& item : t) {
        if (item.is_object() && item.contains("name") && item.at("name") == "default") return item.at("template").get<std::string>();
      }
      return {};
    }
    MOLE_CHECK(t.is_null(), "'", config_path.string(), "': chat_template must be a string or a list of "
               "{name, template}, got ", t.type_name());
  } catch (const nlohmann::json::exception& e) {
    MOLE_FAIL("'", config_path.string(), "': ", e.what());
  }
  return {};
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec);

}  // namespace

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec) {
  std::unique_ptr<Tokenizer> tokenizer = load_tokenizer(spec);
  namespace fs = std::filesystem;
  if (spec != "byte") {
    const fs::path folder = fs::is_directory(spec) ? fs::path(spec) : fs::path(spec).parent_path();
    tokenizer->set_chat_template(read_chat_template(folder));
  }
  return tokenizer;
}

namespace {

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec) {
  if (spec == "byte") return std::make_unique<ByteTokenizer>();
  MOLE_CHECK(!spec.empty(), "tokenizer: empty path (use \"byte\", a tokenizer.json, a sentencepiece model or a "
             "model folder)");
  namespace fs = std::filesystem;
  std::string path = spec;
  if (fs::is_directory(path)) {
    // tokenizer.json first: it is what the library (and so the model's authors) run.
    const std::string json_path = (fs::path(spec) / "tokenizer.json").string();
    path = (fs::path(spec) / "tokenizer.model").string();
    if (fs::is_regular_file(json_path)) {
      if (fs::is_regular_file(path)) {
        spdlog::info("tokenizer: '{}' holds tokenizer.json and tokenizer.model; using tokenizer.json", spec);
      }
      return std::make_unique<HfTokenizer>(json_path);
    }
    const std::string config = (fs::path(spec) / kByteConfig).string();
    if (!fs::is_regular_file(path) && fs::is_regular_file(config) &&
        read_file(config, "the folder's tokenizer_config.json").find("\"mole_tokenizer\": \"byte\"") !=
            std::string::npos) {
      return std::make_unique<ByteTokenizer>();
    }
    MOLE_CHECK(fs::is_regular_file(path), "tokenizer: folder '", spec,
               "' holds no tokenizer.json or tokenizer.model (nor a tokenizer_config.json naming mole's byte "
               "tokenizer); set data.tokenizer to one of those files or \"byte\"");
  }
  if (fs::path(path).extension() == ".json") return std::make_unique<HfTokenizer>(path);
  const std::string serialized = read_file(
      path, "expected \"byte\", a tokenizer.json, a sentencepiece model or a folder with one of them");
  return std::make_unique<SentencePieceTokenizer>(serialized, path);
}

}  // namespace

std::map<std::string, std::string> tokenizer_files(const std::string& spec) {
  if (spec == "byte") return {{kByteConfig, byte_tokenizer_config()}};
  namespace fs = std::filesystem;
  // The tokenizer file travels with what lies beside it: tokenizer_config.json (bos, eos, pad,
  // chat template) and chat_template.jinja.
  const auto with_beside = [](const fs::path& file) {
    std::map<std::string, std::string> files{{file.filename().string(), read_file(file.string(), file.filename().string())}};
    for (const char* name : {"tokenizer_config.json", "chat_template.jinja"}) {
      const fs::path beside = file.parent_path() / name;
      if (fs::is_regular_file(beside)) files[name] = read_file(beside.string(), name);
    }
    return files;
  };
  if (fs::is_directory(spec)) {
    if (fs::is_regular_file(fs::path(spec) / "tokenizer.json")) return with_beside(fs::path(spec) / "tokenizer.json");
    if (fs::is_regular_file(fs::path(spec) / "tokenizer.model")) return with_beside(fs::path(spec) / "tokenizer.model");
    return {{kByteConfig, read_file((fs::path(spec) / kByteConfig).string(), "tokenizer_config.json")}};
  }
  std::map<std::string, std::string> files = with_beside(fs::path(spec));
  // A file named otherwise is stored under the name a folder is read by.
  const std::string name = fs::path(spec).extension() == ".json" ? "tokenizer.json" : "tokenizer.model";
  if (!files.count(name)) {
    files[name] = std::move(files.at(fs::path(spec).filename().string()));
    files.erase(fs::path(spec).filename().string());
  }
  return files;
}

}  // namespace mole::launch
