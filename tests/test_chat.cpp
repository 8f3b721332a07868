// data.format chat: the four chat templates against the official Jinja templates rendered by a
// Jinja engine (tests/tokenizer_fixtures/chat/), ids equal to the tokenizer's ids of the whole
// rendered text, loss masks that cover exactly the assistant turns, truncation, errors that name
// the line, template resolution, threaded loading, and `mole train` end to end with the real
// LLaMA-3 tokenizer.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "launch/chat.h"
#include "launch/data.h"
#include "tests/data_test_util.h"
#include "tests/test_util.h"

namespace mole::launch {
namespace {

using data_test::expect_all;
using data_test::JsonlFile;
using data_test::kIgnore;

const std::string kFixtures = std::string(MOLE_SOURCE_DIR) + "/tests/tokenizer_fixtures";

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

std::vector<ChatMessage> messages_of(const nlohmann::json& conversation) {
  std::vector<ChatMessage> out;
  for (const nlohmann::json& m : conversation.at("messages")) out.push_back({m.at("role"), m.at("content")});
  return out;
}

// The tokenizer whose special tokens a family writes: LLaMA-3's for llama3; LLaMA-2's (<s>, </s>,
// [INST] as text) for llama2 and mistral. ChatML's <|im_start|> is in neither: checked as text.
std::string tokenizer_for(const std::string& family) {
  if (family == "llama3" || family == "llama3.1") return kFixtures + "/llama3";
  if (family == "llama2" || family == "mistral") return kFixtures + "/llama2";
  return "";
}

// Every reference rendering (templates/NAME.jinja rendered by @huggingface/jinja) against mole's,
// with the model's own template handed to the tokenizer so that `auto` finds family and default
// system message. One documented difference: mistral keeps the system message (before the last
// user message), which the official template drops from conversations that end with an answer.
TEST(Chat, RenderingEqualsTheOfficialTemplates) {
  const nlohmann::json conversations = read_json(kFixtures + "/chat/conversations.json");
  const nlohmann::json reference = read_json(kFixtures + "/chat/chat_reference.json").at("families");
  ASSERT_GE(conversations.size(), 10u);
  const std::pair<const char*, const char*> templates[] = {
      {"llama3", "llama3"}, {"llama3.1", "llama3.1"}, {"chatml", "chatml"}, {"chatml_qwen2", "chatml"}, {"mistral", "mistral"}, {"llama2", "llama2"}};
  for (const auto& [name, family_name] : templates) {
    SCOPED_TRACE(name);
    const std::string family = family_name;
    ASSERT_TRUE(reference.contains(name));
    const nlohmann::json& ref = reference.at(name);
    const std::string bos = ref.at("bos_token").is_string() ? ref.at("bos_token").get<std::string>() : "";
    const std::string eos = ref.at("eos_token").get<std::string>();
    const std::unique_ptr<Tokenizer> holder = make_tokenizer("byte");
    holder->set_chat_template(test::read_bytes(kFixtures + "/chat/templates/" + name + ".jinja"));
    const ChatTemplate style = resolve_chat_template("auto", *holder);
    EXPECT_EQ(style.family, family);
    EXPECT_EQ(style.default_system, std::string(name) == "chatml"         ? "You are Qwen, created by Alibaba Cloud. "
                                                                            "You are a helpful assistant."
                                    : std::string(name) == "chatml_qwen2" ? "You are a helpful assistant."
                                                                          : "");
    std::unique_ptr<Tokenizer> tok;
    if (!tokenizer_for(family).empty()) tok = make_tokenizer(tokenizer_for(family));
    for (size_t i = 0; i < conversations.size(); ++i) {
      SCOPED_TRACE("conversation " + std::to_string(i));
      const nlohmann::json& expected = ref.at("rendered").at(i);
      const std::vector<ChatMessage> messages = messages_of(conversations[i]);
      if (expected.is_object()) {  // the official template refuses it: so does mole
        EXPECT_FALSE(test::error_of([&] { render_chat(style, messages, "c"); }).empty());
        continue;
      }
      const std::vector<ChatPiece> pieces = render_chat(style, messages, "c");
      std::string text = expected.get<std::string>();
      if (family == "mistral" && messages.front().role == "system") {
        const size_t last_inst = text.rfind("[INST] ");
        ASSERT_NE(last_inst, std::string::npos);
        text.insert(last_inst + 7, messages.front().content + "\n\n");
      }
      EXPECT_EQ(chat_text(pieces, bos, eos), text);
      if (!tok) continue;
      // Ids: those of the whole rendered text (special tokens matched in it, as the library does).
      const Example e = encode_chat(pieces, *tok, "c");
      EXPECT_EQ(e.input_ids, tok->encode(text));
      // Targets: exactly each assistant content and its end-of-turn token, in order.
      std::string targets, answers;
      std::vector<int64_t> run;
      const auto flush = [&] {
        if (!run.empty()) targets += tok->decode(run) + "|";
        run.clear();
      };
      for (size_t t = 0; t < e.labels.size(); ++t) {
        if (e.labels[t] == kIgnore) {
          flush();
        } else {
          EXPECT_EQ(e.labels[t], e.input_ids[t]);
          run.push_back(e.labels[t]);
        }
      }
      flush();
      const std::string end = family.rfind("llama3", 0) == 0 ? "<|eot_id|>" : eos;
      for (const ChatMessage& m : messages) {
        if (m.role != "assistant") continue;
        std::string content = m.content;
        content.erase(0, content.find_first_not_of(" \n\t"));
        content.erase(content.find_last_not_of(" \n\t") + 1);
        // llama2 writes " ANSWER " before </s>; the decoder drops the leading space.
        answers += content + (family == "llama2" ? " " : "") + end + "|";
      }
      EXPECT_EQ(targets, answers);
    }
  }
}

std::string conversation(const std::string& user, const std::string& answer) {
  return nlohmann::json{{"messages", {{{"role", "user"}, {"content", user}}, {{"role", "assistant"}, {"content", answer}}}}}
      .dump();
}

// LLaMA-3 masks: prompt tokens (BOS, headers, user turns) -100, the answer and <|eot_id|> kept.
TEST(Chat, MasksCoverExactlyTheAssistantTokens) {
  const std::unique_ptr<Tokenizer> tok = make_tokenizer(kFixtures + "/llama3");
  const JsonlFile file({conversation("Say hi.", "Hi there!")});
  const std::vector<Example> examples = file.load(*tok, "chat");
  ASSERT_EQ(examples.size(), 1u);
  const Example& e = examples[0];
  const std::vector<int64_t> prompt = tok->encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                                                  "Say hi.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
  const std::vector<int64_t> answer = tok->encode("Hi there!<|eot_id|>");
  EXPECT_EQ(e.input_ids, data_test::cat({prompt, answer}));
  EXPECT_EQ(e.labels, data_test::cat({data_test::ignored(prompt.size()), answer}));
}

// Longer than seq_len: the first seq_len tokens are kept (a cut answer keeps its first tokens);
// a conversation whose first answer token lies beyond seq_len is dropped, and both are counted.
TEST(Chat, LongConversationsAreTruncatedAsDocumented) {
  const std::unique_ptr<Tokenizer> tok = make_tokenizer(kFixtures + "/llama3");
  const std::string long_answer = "one two three four five six seven eight nine ten";
  const JsonlFile file({conversation("Count.", long_answer), conversation(std::string(400, 'x'), "ok")});
  const std::vector<Example> full = file.load(*tok, "chat", 512);
  ASSERT_EQ(full.size(), 2u);
  DatasetStats stats;
  const int64_t seq_len = 20;
  const std::vector<Example> cut = file.load(*tok, "chat", seq_len, &stats);
  ASSERT_EQ(cut.size(), 1u);
  EXPECT_EQ(stats.truncated, 1);
  EXPECT_EQ(stats.dropped, 1);
  EXPECT_EQ(cut[0].input_ids, std::vector<int64_t>(full[0].input_ids.begin(), full[0].input_ids.begin() + seq_len));
  EXPECT_EQ(cut[0].labels, std::vector<int64_t>(full[0].labels.begin(), full[0].labels.begin() + seq_len));
}

TEST(Chat, BadConversationsNameTheLine) {
  const std::unique_ptr<Tokenizer> tok = make_tokenizer(kFixtures + "/llama3");
  const std::string good = conversation("a", "b");
  const auto error = [&](const std::string& bad) {
    const JsonlFile file({good, bad});
    return test::error_of([&] { file.load(*tok, "chat"); });
  };
  expect_all(error(R"({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]})"),
             {"data.jsonl:2", "messages[0]", "role 'robot'", "system, user, assistant"});
  expect_all(error(R"({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]})"),
             {"data.jsonl:2", "no assistant message"});
  expect_all(error(R"({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]})"),
             {"data.jsonl:2", "messages[0].content must be a string"});
  expect_all(error(R"({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]})"),
             {"data.jsonl:2", "messages[0] has no 'content'"});
  expect_all(error(R"({"messages": "hello"})"), {"data.jsonl:2", "'messages' must be an array"});
  expect_all(error(R"({"messages": []})"), {"data.jsonl:2", "'messages' is empty"});
  expect_all(error(R"({"text": "hello"})"), {"data.jsonl:2", "missing field 'messages'"});
  // Templates that need alternating roles say so.
  DataOptions o;
  const JsonlFile twice({R"({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, )"
                         R"({"role": "assistant", "content": "c"}]})"});
  o.path = twice.path;
  o.format = "chat";
  o.chat_template = "llama2";
  const std::unique_ptr<Tokenizer> llama2 = make_tokenizer(kFixtures + "/llama2");
  expect_all(test::error_of([&] { load_dataset(o, *llama2); }),
             {"data.jsonl:1", "messages[1] has role 'user'", "template llama2", "alternate"});
  // A template whose special tokens the tokenizer lacks.
  o.chat_template = "chatml";
  expect_all(test::error_of([&] { load_dataset(o, *llama2); }), {"data.jsonl:1", "'<|im_start|>'", "data.template"});
}

TEST(Chat, TemplateIsTheTokenizersUnlessNamed) {
  const std::unique_ptr<Tokenizer> llama3 = make_tokenizer(kFixtures + "/llama3");
  EXPECT_EQ(resolve_chat_template("auto", *llama3).family, "llama3");
  EXPECT_EQ(resolve_chat_template("chatml", *llama3).family, "chatml");
  EXPECT_EQ(resolve_chat_template("chatml", *llama3).default_system, "");
  expect_all(test::error_of([&] { resolve_chat_template("vicuna", *llama3); }), {"data.template 'vicuna'", "llama2"});
  const std::unique_ptr<Tokenizer> byte = make_tokenizer("byte");
  expect_all(test::error_of([&] { resolve_chat_template("auto", *byte); }),
             {"no chat template", "data.template", "llama3, llama3.1, chatml, mistral, llama2"});
  // A folder whose tokenizer_config.json carries a template mole does not know, or a list of them.
  test::TempDir dir;
  test::write_bytes(dir.file("tokenizer.json"), test::read_bytes(kFixtures + "/llama2/tokenizer.json"));
  test::write_bytes(dir.file("tokenizer_config.json"),
                    R"({"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ '### Human: ' }}"})");
  expect_all(test::error_of([&] { resolve_chat_template("auto", *make_tokenizer(dir.path())); }),
             {"none that mole renders", "set data.template"});
  test::write_bytes(dir.file("tokenizer_config.json"),
                    R"({"chat_template": [{"name": "tool_use", "template": "x"},)"
                    R"( {"name": "default", "template": "{{ '[INST] ' }}"}]})");
  EXPECT_EQ(resolve_chat_template("auto", *make_tokenizer(dir.path())).family, "mistral");
  // Without one named "default" there is none (as transformers decides).
  test::write_bytes(dir.file("tokenizer_config.json"), R"({"chat_template": [{"name": "tool_use", "template": "x"}]})");
  expect_all(test::error_of([&] { resolve_chat_template("auto", *make_tokenizer(dir.path())); }), {"no chat template"});
  // chat_template.jinja (newer transformers) is read first, and travels with the tokenizer.
  test::write_bytes(dir.file("chat_template.jinja"), test::read_bytes(kFixtures + "/chat/templates/llama2.jinja"));
  EXPECT_EQ(resolve_chat_template("auto", *make_tokenizer(dir.path())).family, "llama2");
  EXPECT_TRUE(tokenizer_files(dir.path()).count("chat_template.jinja"));
  // Relatives that render differently are not taken for a family.
  EXPECT_EQ(recognise_chat_template(test::read_bytes(kFixtures + "/chat/templates/mistral_v0.2.jinja")), "");
  EXPECT_EQ(recognise_chat_template(test::read_bytes(kFixtures + "/chat/templates/qwen3.jinja")), "");
  // A default system message is read as Jinja reads its string literal (escapes, braces).
  const std::unique_ptr<Tokenizer> math = make_tokenizer("byte");
  math->set_chat_template(
      R"({%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\nPut the answer in \\boxed{}; it\'s short.<|im_end|>\n' }})"
      R"({%- endif %}{%- for message in messages %}{{- '<|im_start|>' + message.role + '\n' }}{%- endfor %})");
  EXPECT_EQ(resolve_chat_template("auto", *math).default_system, "Put the answer in \\boxed{}; it's short.");
  // The byte tokenizer with a named template that writes only BOS and EOS as special tokens.
  const JsonlFile file({conversation("a", "b")});
  DataOptions o;
  o.path = file.path;
  o.format = "chat";
  o.chat_template = "llama2";
  const std::vector<Example> examples = load_dataset(o, *byte);
  ASSERT_EQ(examples.size(), 1u);
  EXPECT_EQ(examples[0].input_ids.front(), byte->bos_id());
  EXPECT_EQ(examples[0].input_ids.back(), byte->eos_id());
  EXPECT_EQ(byte->decode(examples[0].input_ids), "[INST] a [/INST] b ");
}

// Threads only share out the lines: the examples and the first error do not depend on them.
TEST(Chat, ThreadedLoadingGivesTheSameExamples) {
  const std::unique_ptr<Tokenizer> tok = make_tokenizer(kFixtures + "/llama3");
  DataOptions o;
  o.path = std::string(MOLE_SOURCE_DIR) + "/examples/data/chat-tasks.jsonl";
  o.format = "chat";
  o.seq_len = 128;
  DatasetStats one_stats, four_stats;
  const std::vector<Example> one = load_dataset(o, *tok, &one_stats);
  o.threads = 4;
  const std::vector<Example> four = load_dataset(o, *make_tokenizer(kFixtures + "/llama3"), &four_stats);
  ASSERT_EQ(one.size(), four.size());
  EXPECT_GE(one.size(), 500u);
  for (size_t i = 0; i < one.size(); ++i) {
    EXPECT_EQ(one[i].input_ids, four[i].input_ids) << i;
    EXPECT_EQ(one[i].labels, four[i].labels) << i;
  }
  EXPECT_EQ(one_stats.truncated, four_stats.truncated);
  std::vector<std::string> lines;
  for (int i = 0; i < 40; ++i) lines.push_back(conversation("q" + std::to_string(i), "a"));
  lines[13] = R"({"messages": [{"role": "user", "content": 1}]})";
  lines[31] = "not json";
  test::TempDir dir;
  std::string text;
  for (const std::string& l : lines) text += l + "\n";
  test::write_bytes(dir.file("bad.jsonl"), text);
  o.path = dir.file("bad.jsonl");
  expect_all(test::error_of([&] { load_dataset(o, *tok); }), {"bad.jsonl:14", "content must be a string"});
}

}  // namespace
}  // namespace mole::launch

namespace mole::launch {
namespace {

// `mole train` on examples/chat-llama3.yaml, shortened: the real LLaMA-3 tokenizer (128256
// entries) on a LLaMA-3-architecture synthetic base with chat data; the loss falls.
TEST(Chat, TrainsEndToEndWithTheLlama3Tokenizer) {
  test::TempDir dir;
  const std::string source = MOLE_SOURCE_DIR;
  const test::CommandResult r = test::run_command(
      std::string(MOLE_BINARY) + " train " + source + "/examples/chat-llama3.yaml --set train.steps=8 --set log.every=1" +
      " --set train.warmup=0 --set data.seq_len=96 --set train.micro_batch=4 --set train.global_batch=8" +
      " --set data.train=" + source + "/examples/data/chat-tasks.jsonl --set data.tokenizer=" +
      kFixtures + "/llama3 --set log.dir=" + dir.file("run"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_all(r.output, {"chat template llama3", "512 training examples"});
  std::vector<double> losses;
  std::ifstream metrics(dir.file("run/metrics.jsonl"));
  for (std::string line; std::getline(metrics, line);) losses.push_back(nlohmann::json::parse(line).at("loss"));
  ASSERT_EQ(losses.size(), 8u);
  // Random init over 128256 entries starts near ln(128256) = 11.76.
  EXPECT_NEAR(losses.front(), 11.76, 0.5);
  EXPECT_LT(losses.back(), losses.front() - 1.0) << r.output;
  // The run's base folder carries the tokenizer and its chat template.
  const std::unique_ptr<Tokenizer> saved = make_tokenizer(dir.file("run/base"));
  EXPECT_EQ(saved->vocab_size(), 128256);
  EXPECT_EQ(resolve_chat_template("auto", *saved).family, "llama3");
}

}  // namespace
}  // namespace mole::launch
