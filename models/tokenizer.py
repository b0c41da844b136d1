"""Tokenizer on HF ``tokenizers``: built from GGUF metadata or loaded from ``tokenizer.json``.

GGUF ``tokenizer.ggml.model == "gpt2"`` is byte-level BPE: the vocabulary,
the merges, and a pre-tokenizer chosen by ``tokenizer.ggml.pre`` the way
llama.cpp chooses it (``smollm`` and the GPT-2 default split digits one by one,
as SmolLM2's own ``tokenizer.json`` does; ``llama-bpe`` / ``llama3`` use the
Llama-3 regex; ``qwen2`` the Qwen2 regex). Tokens typed CONTROL become special
tokens (matched whole, dropped by ``decode(skip_special_tokens=True)``).
"""
from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from ferry.models.chat_template import render

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "smaug-bpe": _LLAMA3, "qwen2": _QWEN2}
CONTROL, USER_DEFINED = 3, 4


def _pre_tokenizer(pre: str | None):
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    # "smollm", "gpt2", "default": GPT-2 regex with single digits
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


class Tokenizer:
    """``encode`` / ``decode`` / ``apply_chat_template`` with the model's special tokens.

    Attributes: ``vocab_size``, ``bos_token_id``, ``eos_token_ids`` (tuple),
    ``chat_template`` (str or None), ``add_bos`` (prepend BOS in ``encode``).
    """

    def __init__(self, tok: _HFTokenizer, bos_token_id: int | None, eos_token_ids: tuple[int, ...],
                 chat_template: str | None = None, add_bos: bool = False, vocab_size: int | None = None) -> None:
        self._tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.vocab_size = vocab_size or tok.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf_metadata(cls, meta: dict, what: str = "GGUF file") -> "Tokenizer":
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{what}: tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
        tokens = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        tok.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or []
        special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
        if special:
            tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = [eos] if eos is not None else []
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if eot is not None and eot not in eos_ids:
            eos_ids.append(eot)
        return cls(tok, meta.get("tokenizer.ggml.bos_token_id"), tuple(int(i) for i in eos_ids),
                   meta.get("tokenizer.chat_template"), bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   vocab_size=len(tokens))

    @classmethod
    def from_dir(cls, directory: str, eos_token_ids: tuple[int, ...] = ()) -> "Tokenizer":
        """``tokenizer.json`` (+ ``tokenizer_config.json``) as HF or ``save`` writes them."""
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"{directory}: no tokenizer.json")
        try:
            tok = _HFTokenizer.from_file(path)
        except Exception as e:                          # tokenizers raises plain Exception
            raise ValueError(f"{path}: cannot parse tokenizer ({e})") from e
        cfg = {}
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)

        def tid(name):
            t = cfg.get(name)
            t = t.get("content") if isinstance(t, dict) else t
            return tok.token_to_id(t) if isinstance(t, str) else None

        bos = cfg.get("bos_token_id", tid("bos_token"))
        eos = tuple(cfg.get("eos_token_ids") or eos_token_ids or ([tid("eos_token")] if tid("eos_token") is not None
                                                                  else []))
        template = cfg.get("chat_template")
        if isinstance(template, list):                  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and os.path.isfile(os.path.join(directory, "chat_template.jinja")):
            with open(os.path.join(directory, "chat_template.jinja")) as f:
                template = f.read()
        return cls(tok, bos, eos, template, bool(cfg.get("add_bos_token", False)), cfg.get("vocab_size"))

    def save(self, directory: str) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (loadable by ``from_dir``)."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        cfg = {"bos_token": self._token(self.bos_token_id), "bos_token_id": self.bos_token_id,
               "eos_token": self._token(self.eos_token_ids[0]) if self.eos_token_ids else None,
               "eos_token_ids": list(self.eos_token_ids), "add_bos_token": self.add_bos,
               "chat_template": self.chat_template, "vocab_size": self.vocab_size}
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)

    # ------------------------------------------------------------------ use
    def _token(self, i: int | None) -> str | None:
        return self._tok.id_to_token(i) if i is not None else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens``, BOS first when the model adds one.

        BOS is never doubled: text that already starts with the BOS token (a
        chat template that renders ``bos_token`` itself) gets no second one.
        """
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kwargs):
        """Render the conversation with the model's template (text, or ids with ``tokenize=True``).

        As in transformers, the ids are the rendered text encoded without
        adding special tokens: BOS appears exactly when the template renders it.
        """
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass a plain prompt instead")
        text = render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                      bos_token=self._token(self.bos_token_id) or "",
                      eos_token=self._token(self.eos_token_ids[0]) if self.eos_token_ids else "", **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text
