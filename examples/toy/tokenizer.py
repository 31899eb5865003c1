"""The toy's tokenizer: one token per character of the generated corpus, plus special tokens, saved in HF format.

    python examples/toy/tokenizer.py --data data/toy --out data/toy-tokenizer

Why character-level: the corpus uses ~60 distinct characters, so the vocabulary stays tiny (a few-million-parameter
model spends little on embeddings), every digit is its own token (a BPE would merge "12" or "00" and hide the
place-value structure that makes arithmetic learnable), and every generated string round-trips exactly. The
"training" is therefore collecting the corpus alphabet; `tokenizers` does the encoding (a BPE model with no merges)
and `transformers` the saving, loading and chat template.

Chat format (the Jinja template below): <bos>, then each turn as <|role|>content<|end|>, and after the last turn
with add_generation_prompt the opening <|assistant|>. <|end|> is the EOS token, so generation stops at the end of
the assistant's turn. The assistant's content is wrapped in {% generation %} so that
apply_chat_template(..., return_assistant_tokens_mask=True) marks the tokens an SFT loss should train on.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<bos>", "<|end|>", "<pad>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]  # ids 0.. in this order
TEXT_FIELDS = ("prompt", "answer", "solution")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MODEL_MAX_LENGTH = 1024


def corpus_texts(data_dir: str | Path) -> Iterator[str]:
    """Every prompt, answer and solution string in the jsonl files under data_dir (hidden files skipped)."""
    files = sorted(p for p in Path(data_dir).rglob("*.jsonl")
                   if not any(part.startswith(".") for part in p.relative_to(data_dir).parts))
    if not files:
        raise FileNotFoundError(f"no .jsonl files under {data_dir}")
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                for name in TEXT_FIELDS:
                    value = row.get(name)
                    if value is None:
                        continue
                    if not isinstance(value, str):
                        raise ValueError(f"{path}:{line_number}: `{name}` must be a string, got {value!r}")
                    yield value


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over the characters of `texts` (sorted, after the special tokens)."""
    alphabet = sorted(set().union(*map(set, texts)))
    if not alphabet:
        raise ValueError("the corpus is empty: no characters to build a vocabulary from")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet)}
    # No pre-tokenizer and no merges: the BPE model splits the text into characters and looks each one up.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()  # concatenate the characters back, adding no spaces
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS, chat_template=CHAT_TEMPLATE, model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # exact round trips: never touch spaces around punctuation
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="directory of the generated jsonl files (make_data.py --out)")
    parser.add_argument("--out", required=True, help="where to save the tokenizer (HF format)")
    args = parser.parse_args(argv)
    try:
        tokenizer = build_tokenizer(corpus_texts(args.data))
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    tokenizer.save_pretrained(args.out)
    print(f"saved a {len(tokenizer)}-token character tokenizer to {args.out}")


if __name__ == "__main__":
    main()
