#!/usr/bin/env python3
"""Write a tiny, random-weight, llama-architecture GGUF model for the end-to-end tests.

Adapted from ../shared/tools/make_tiny_gguf.py; ``write_tiny_model(path)`` is what the tests call.

The file is small enough to generate on every test run, yet llama.cpp's
llama-server loads it and runs real inference on it: tokenizer, attention,
KV cache, sampling, streaming, embeddings all work.  The text it produces
is gibberish, but always printable ASCII (see the bias channel below), never
ends early (EOS is suppressed, so finish_reason is "length"), and is
deterministic for a given file and request at temperature 0 (the same text
came out of three different llama.cpp builds).  The file itself is
byte-identical for the same arguments and gguf version.

Tokenizer: a genuine GPT-2 style byte-level BPE ("gpt2" model, "gpt-2"
pre-tokenizer), trained here, in pure Python, on a short built-in text.
It has all 256 byte tokens, so any UTF-8 input tokenizes; a few hundred
learned merges; and the ChatML control tokens <|im_start|>, <|im_end|>
(EOS) and <|endoftext|> (BOS), with a ChatML chat template, so
/v1/chat/completions works without --chat-template.

Needs only the `gguf` package from PyPI (it brings numpy).

    python make_tiny_gguf.py tiny.gguf            # ~0.6 MB, in well under 1 s
    llama-server -m tiny.gguf --port 8080 -c 512
    llama-server -m tiny.gguf --port 8081 -c 512 --embeddings --pooling mean
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

import gguf
import numpy as np

# Text the BPE merges are learned from.  Any text would do; this one is
# ordinary English plus some code-like and numeric bits.
CORPUS = """\
The proxy listens on a local port and forwards each request to the model server.
When the server starts, it loads the model, allocates the context and then
answers health checks with a status of ok. A client sends a chat message and the
server streams the answer back, one token at a time, as server-sent events.
Tests start the server on a free port, wait until it is ready, send a few
requests and check the replies, then stop the server and clean up.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today?
def main(argv=None): return 0 if argv is None else len(argv)
{"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "stream": true}
GET /health HTTP/1.1  POST /v1/chat/completions  POST /v1/completions  /v1/models
0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 512 1024 2048 4096 3.14 2.71 1e-5
Once upon a time there was a small model that could only say strange things,
but it said them quickly and it always said the same thing for the same question.
"""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Rough GPT-2-like pre-tokenizer (Python's re has no \p{L}); merges learned with
# it are still valid merges for llama.cpp's own gpt-2 pre-tokenizer.
PRETOKENIZE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping = {}
    extra = 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def train_bpe(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Learn up to n_merges byte-level BPE merges from text, deterministically."""
    b2u = byte_to_unicode()
    words = collections.Counter(
        tuple(b2u[b] for b in piece.encode("utf-8")) for piece in PRETOKENIZE.findall(text)
    )
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        # most frequent pair; ties broken by the pair itself, so runs are reproducible
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new_words: collections.Counter = collections.Counter()
        for word, count in words.items():
            out = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    return merges


def build_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    b2u = byte_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    n_merges = n_vocab - 256 - len(SPECIAL_TOKENS)
    if n_merges < 1:   # llama.cpp refuses a BPE vocabulary without merges
        raise SystemExit(f"--vocab must be at least {256 + len(SPECIAL_TOKENS) + 1}")
    merges = train_bpe(CORPUS, n_merges)
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    # pad with unused filler tokens if the corpus ran out of merges
    while len(tokens) < n_vocab - len(SPECIAL_TOKENS):
        tokens.append(f"<|unused_{len(tokens)}|>")
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for i, t in enumerate(tokens):
        if t.startswith("<|unused_"):
            types[i] = gguf.TokenType.UNUSED
    tokens += SPECIAL_TOKENS
    types += [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    return tokens, [int(t) for t in types], [f"{a} {b}" for a, b in merges]


def write_model(path: str, n_vocab: int, n_embd: int, n_layer: int, n_head: int,
                n_head_kv: int, n_ff: int, n_ctx: int, seed: int, f16: bool) -> None:
    if n_embd % n_head or n_head % n_head_kv:
        raise SystemExit("n_embd must be divisible by n_head, and n_head by n_head_kv")
    head_dim = n_embd // n_head
    tokens, types, merges = build_vocab(n_vocab)
    rng = np.random.default_rng(seed)
    wtype = np.float16 if f16 else np.float32

    def weight(rows: int, cols: int, scale: float) -> np.ndarray:
        # numpy shape (rows, cols) == GGUF/ggml shape (cols, rows): (out_features, in_features)
        return (rng.standard_normal((rows, cols)) * scale).astype(wtype)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)   # norms stay f32

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-random-llama")
    w.add_description("random weights, for tests only; output is gibberish")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)

    # Weights: N(0, 1/fan_in), so the residual stream stays O(1) at any size.
    # Channel 0 of the residual stream is a constant "bias" channel: every
    # token embedding holds BIAS there and no layer writes to it, so after the
    # final RMSNorm it is always clearly positive.  Output rows of tokens that
    # must never be generated (non-ASCII / control bytes, special and unused
    # tokens) are zero except for a large negative weight on that channel,
    # which gives them a logit far below every other token's.  The generated
    # text is therefore printable ASCII (plus newlines): valid UTF-8, which
    # llama-server's output parser needs (with random byte tokens it answers
    # 500 "does not match the expected ... format").  EOS is never generated
    # either, so every request runs to max_tokens (finish_reason "length").
    bias = 10.0

    def linear(n_out: int, n_in: int) -> np.ndarray:
        return weight(n_out, n_in, n_in ** -0.5)

    def no_bias_write(m: np.ndarray) -> np.ndarray:
        m[0, :] = 0.0   # output row 0 of attn_output / ffn_down: never write channel 0
        return m

    embd = weight(len(tokens), n_embd, 1.0)
    embd[:, 0] = bias
    out = weight(len(tokens), n_embd, 1.0)
    out[:, 0] = 0.0
    u2b = {u: b for b, u in byte_to_unicode().items()}
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        raw = bytes(u2b[c] for c in tok) if typ == gguf.TokenType.NORMAL else b"\x00"
        if not all(0x20 <= b < 0x7F or b == 0x0A for b in raw):
            out[i, :] = 0.0
            out[i, 0] = -50.0

    w.add_tensor("token_embd.weight", embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(n_embd))
        w.add_tensor(p + "attn_q.weight", linear(n_head * head_dim, n_embd))
        w.add_tensor(p + "attn_k.weight", linear(n_head_kv * head_dim, n_embd))
        w.add_tensor(p + "attn_v.weight", linear(n_head_kv * head_dim, n_embd))
        w.add_tensor(p + "attn_output.weight", no_bias_write(linear(n_embd, n_head * head_dim)))
        w.add_tensor(p + "ffn_norm.weight", ones(n_embd))
        w.add_tensor(p + "ffn_gate.weight", linear(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", linear(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", no_bias_write(linear(n_embd, n_ff)))
    w.add_tensor("output_norm.weight", ones(n_embd))
    w.add_tensor("output.weight", out)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_model(path: str) -> str:
    """Write the default tiny model (vocab 512, 64-dim, 2 layers, f32, ~0.6 MB) to ``path``."""
    write_model(path, 512, 64, 2, 4, 2, 128, 4096, 0, False)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", help="path of the .gguf file to write")
    ap.add_argument("--vocab", type=int, default=512, help="vocabulary size (>= 260)")
    ap.add_argument("--embd", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ff", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=4096, help="training context length stored in the file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--f16", action="store_true", help="store matrices as f16 instead of f32")
    a = ap.parse_args(argv)
    write_model(a.output, a.vocab, a.embd, a.layers, a.heads, a.kv_heads, a.ff, a.ctx, a.seed, a.f16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
