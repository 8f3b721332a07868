"""Writes chat-tasks.jsonl: conversations for `data.format: chat` (examples/chat-llama3.yaml).

Each conversation asks for string transformations picked by a task word (reverse, upper, sort,
count, double), one to three user/assistant turns, half of them after a system message, so that
the answers follow from the questions and a model can learn them. Deterministic:
    python3 examples/data/make_chat_tasks.py > examples/data/chat-tasks.jsonl
"""
import json
import random

rng = random.Random(17)
WORDS = ("apple river stone cloud mirror garden pencil window rocket violin silver marble "
         "forest candle ladder planet harbor meadow comet tunnel").split()
SYSTEM = "You transform words exactly as asked and answer with the result only."


def task():
    word = rng.choice(WORDS) + rng.choice(["", "", rng.choice(WORDS)])
    kind = rng.choice(["reverse", "upper", "sort", "count", "double"])
    question = {
        "reverse": f"Reverse the word '{word}'.",
        "upper": f"Write '{word}' in capital letters.",
        "sort": f"Sort the letters of '{word}' alphabetically.",
        "count": f"How many letters does '{word}' have?",
        "double": f"Repeat '{word}' twice, separated by a space.",
    }[kind]
    answer = {
        "reverse": word[::-1],
        "upper": word.upper(),
        "sort": "".join(sorted(word)),
        "count": str(len(word)),
        "double": f"{word} {word}",
    }[kind]
    return question, answer


for _ in range(512):
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        question, answer = task()
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    print(json.dumps({"messages": messages}, ensure_ascii=False))
