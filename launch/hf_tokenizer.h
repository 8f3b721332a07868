// Hugging Face `tokenizer.json`, interpreted as its own specification (the models people fine-tune
// today, LLaMA-3, Qwen2, newer Mistral, ship only this file). Supported components:
//   normalizers     NFC, NFKC, NFD, NFKD, Lowercase, Prepend, Replace (string or regex), Sequence
//   pre-tokenizers  Split (string or regex; Isolated, Removed, MergedWithPrevious, MergedWithNext,
//                   Contiguous; invert), ByteLevel (with or without its GPT-2 regex), Metaspace
//                   (prepend scheme always / first / never, split), Digits, Whitespace, Sequence
//   model           BPE: merges as "a b" strings or pairs, ignore_merges, byte_fallback, unk and
//                   fuse_unk (continuing_subword_prefix / end_of_word_suffix / dropout: errors)
//   added tokens    matched in the raw text before anything else, as the library does (lstrip,
//                   rstrip honoured)
//   post-processor  TemplateProcessing (single sequences), ByteLevel, Sequence
//   decoders        ByteLevel, Metaspace, ByteFallback, Fuse, Strip, Replace, Sequence
// Anything else is an error naming the component and the file. Regular expressions and Unicode
// normalisation are ICU's (the Split regexes use (?i:...), \p{L}, \p{N} and look-ahead).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "launch/data.h"

namespace mole::launch {

class HfTokenizer final : public Tokenizer {
 public:
  // Reads `path` (a tokenizer.json). Throws mole::Error naming the file and the component.
  explicit HfTokenizer(const std::string& path);
  ~HfTokenizer() override;

  // No special tokens added (special-token text in `text` is still matched as such).
  std::vector<int64_t> encode(const std::string& text) const override;
  // As the post-processor adds them (e.g. BOS first).
  std::vector<int64_t> encode_with_special(const std::string& text) const override;
  // Special tokens kept in the text.
  std::string decode(const std::vector<int64_t>& ids) const override;
  int64_t vocab_size() const override;
  int64_t bos_id() const override;
  int64_t eos_id() const override;
  int64_t pad_id() const override;
  // Token id of `token` (vocabulary or added token); -1 when there is none.
  int64_t token_id(const std::string& token) const override;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace mole::launch
