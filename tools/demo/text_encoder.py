"""Frozen, constructed weights for the demo's Qwen3 text encoder: two attention layers that parse a shape caption.

Why not random weights: a randomly initialised Qwen3 mixes every earlier token into every hidden state, so in
"a red circle on a blue background" the two colours are nearly indistinguishable, and a tiny transformer
trained for minutes on two CPU cores never untangles them (measured: colour adherence at chance, 15-25 %).
So the encoder is not trained but built, deterministically, from the tokenizer's vocabulary:

* embedding: 4 constant dims, then a one-hot of the token's word (colour, shape, "background", position word,
  or "other"); the padding token carries only a padding flag;
* layer 0, one head: attends to the previous token (a RoPE-only pattern) and copies its colour, so "circle"
  in "red circle" and "background" in "blue background" now carry their colours;
* layer 1, three heads whose keys fire only on shape words, on "background" and on position words: every later
  token (the whole padding included) copies the shape's colour and class, the background colour and the
  position into four summary slots;
* layers 2-27 are identities (zero output projections), so the pipeline's layers 9, 18 and 27 all see it.

The result is the real Qwen3ForCausalLM class with ordinary weights; export, ONNX, FP8 and TensorRT treat it
like any other Klein text encoder. `describe()` decodes the slots, for tests and for curious readers.
"""

from __future__ import annotations

import math

import torch

from tools.demo import shapes

HIDDEN, HEADS, HEAD_DIM = 64, 4, 16
CONST = slice(0, 4)
OWN_COLOR, OWN_SHAPE, OWN_BACKGROUND, OWN_POSITION, OWN_OTHER = slice(4, 12), slice(12, 15), 15, slice(16, 21), 21
PREV_COLOR = slice(22, 30)
SLOT_SHAPE_COLOR, SLOT_BACKGROUND, SLOT_SHAPE, SLOT_POSITION = slice(30, 38), slice(38, 46), slice(46, 49), slice(49, 54)
PAD_FLAG = 54
POSITION_WORDS = {"center": 0, "centre": 0, "middle": 0, "left": 1, "right": 2, "top": 3, "bottom": 4}

# Layer 0: weights on RoPE frequency pairs 0-3 that make relative position 1 the clear maximum over positions
# 0..79 (a small linear program: worst margin 0.26 of the total), and the total that turns that margin into
# ~12 logits.
PAIR_WEIGHTS = (0.5493, 0.1568, 0.1721, 0.1217)
SCALE = 184.0
# Layer 1: the content heads use RoPE pair 7 (the slowest: under 0.17 rad over 512 positions), at 30 logits.
CONTENT_PAIR, CONTENT_LOGITS = 7, 30.0


def word_of(token: str) -> str:
    return token.replace("\u0120", "").lower()  # byte-level BPE marks a leading space with U+0120


def _rms(sum_sq: float) -> float:
    return math.sqrt(sum_sq / HIDDEN)


@torch.no_grad()
def set_weights(text_encoder, tokenizer) -> None:
    """Overwrite a Qwen3ForCausalLM (hidden 64, 4 heads of 16, rope theta 1e4) with the parser described above."""
    cfg = text_encoder.config
    if (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) != (
        HIDDEN, HEADS, HEADS, HEAD_DIM
    ):
        raise ValueError(f"text encoder must have hidden {HIDDEN}, {HEADS} heads and {HEADS} kv heads of {HEAD_DIM}")
    model = text_encoder.model
    for p in text_encoder.parameters():
        p.zero_()
    for name, p in text_encoder.named_parameters():  # RMSNorm weights back to one
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            p.fill_(1.0)

    emb = model.embed_tokens.weight
    for token, i in tokenizer.get_vocab().items():
        word = word_of(token)
        if i == tokenizer.pad_token_id:
            emb[i, PAD_FLAG] = 1.0
            continue
        emb[i, CONST] = 1.0
        if word in shapes.PALETTE:
            emb[i, OWN_COLOR.start + shapes.COLORS.index(word)] = 1.0
        elif word in shapes.SHAPES:
            emb[i, OWN_SHAPE.start + shapes.SHAPES.index(word)] = 1.0
        elif word == "background":
            emb[i, OWN_BACKGROUND] = 1.0
        elif word in POSITION_WORDS:
            emb[i, OWN_POSITION.start + POSITION_WORDS[word]] = 1.0
        else:
            emb[i, OWN_OTHER] = 1.0
    _previous_token_head(model.layers[0].self_attn, cfg)
    _content_heads(model.layers[1].self_attn)
    text_encoder.eval()


def _previous_token_head(attn, cfg) -> None:
    """Head 0 of layer 0: query and key from the constant dims, so the pattern depends on position alone."""
    rms = _rms(4 + 1)  # RMSNorm divisor of every non-padding embedding: 4 constants and one word dim
    theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    half = HEAD_DIM // 2
    q, k = torch.zeros(HEAD_DIM), torch.zeros(HEAD_DIM)
    for i, w in enumerate(PAIR_WEIGHTS):
        freq = theta ** (-2 * i / HEAD_DIM)
        r = math.sqrt(SCALE * w)
        q[i] = r
        k[i], k[i + half] = r * math.cos(freq), r * math.sin(freq)  # key rotated one step ahead
    attn.q_proj.weight[:HEAD_DIM, CONST] = q[:, None] * rms / 4
    attn.k_proj.weight[:HEAD_DIM, CONST] = k[:, None] * rms / 4
    attn.q_norm.weight.fill_(q.pow(2).mean().sqrt().item())  # RMSNorm then gives back q exactly
    attn.k_norm.weight.fill_(k.pow(2).mean().sqrt().item())
    # Padding has no constant dims: query zero, an even average over the prompt (small, and never a key).
    n = OWN_COLOR.stop - OWN_COLOR.start
    attn.v_proj.weight[:n, OWN_COLOR] = torch.eye(n)
    attn.o_proj.weight[PREV_COLOR, :n] = torch.eye(n) * rms


def _content_heads(attn) -> None:
    """Layer 1, heads 0-2: a key that fires only on one kind of word; the value is copied into a summary slot."""
    gain = math.sqrt(CONTENT_LOGITS / 4)  # score = scaling (1/4) * (4 g)(4 g) after the two RMSNorms
    attn.q_norm.weight.fill_(gain)
    attn.k_norm.weight.fill_(gain)
    heads = [  # (key dims, [(value source, output slot)], RMSNorm divisor of the key token)
        (OWN_SHAPE, [(PREV_COLOR, SLOT_SHAPE_COLOR), (OWN_SHAPE, SLOT_SHAPE)], _rms(4 + 1 + 1)),
        (slice(OWN_BACKGROUND, OWN_BACKGROUND + 1), [(PREV_COLOR, SLOT_BACKGROUND)], _rms(4 + 1 + 1)),
        (OWN_POSITION, [(OWN_POSITION, SLOT_POSITION)], _rms(4 + 1)),
    ]
    for h, (key_dims, copies, rms) in enumerate(heads):
        row = h * HEAD_DIM + CONTENT_PAIR
        attn.q_proj.weight[row, CONST] = 1.0  # every token asks the same question ...
        attn.q_proj.weight[row, PAD_FLAG] = 1.0  # ... padding included
        attn.k_proj.weight[row, key_dims] = 1.0
        col = h * HEAD_DIM
        for src, dst in copies:
            n = src.stop - src.start
            attn.v_proj.weight[col : col + n, src] = torch.eye(n)
            attn.o_proj.weight[dst, col : col + n] = torch.eye(n) * rms
            col += n


def describe(hidden: torch.Tensor) -> dict:
    """Decode the summary slots of one token's hidden state (layer 9/18/27 output, 64 dims) into attributes."""
    def pick(sl, names):
        v = hidden[sl]
        return names[int(v.argmax())] if float(v.max()) > 0.5 else None

    return {
        "shape_color": pick(SLOT_SHAPE_COLOR, shapes.COLORS),
        "background": pick(SLOT_BACKGROUND, shapes.COLORS),
        "shape": pick(SLOT_SHAPE, shapes.SHAPES),
        "position": pick(SLOT_POSITION, shapes.POSITIONS),
    }
