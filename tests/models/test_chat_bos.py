"""BOS is never doubled: chat prompts get the same ids as transformers' ``apply_chat_template(tokenize=True)``.

Built offline: a byte-level BPE tokenizer (one token per byte) with special
tokens, wrapped both by Ferry's ``Tokenizer`` and by transformers'
``PreTrainedTokenizerFast`` (whose post-processor adds BOS, as Llama-3's does),
with a Llama-3-style template that renders ``bos_token`` and a ChatML-style
template that does not.
"""
import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTok

from ferry.engine.server import protocol
from ferry.engine.server.handlers import _Handler
from ferry.models.tokenizer import Tokenizer

BOS, EOS, START, END = "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"
LLAMA3 = ("{{ bos_token }}{% for m in messages %}" + START + "{{ m['role'] }}" + END +
          "\n\n{{ m['content'] }}" + EOS + "{% endfor %}"
          "{% if add_generation_prompt %}" + START + "assistant" + END + "\n\n{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, wörld!"}]


def _raw() -> HFTok:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = HFTok(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (BOS, EOS, START, END, "<|im_start|>", "<|im_end|>")])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def _pair(template: str):
    transformers = pytest.importorskip("transformers")
    raw = _raw()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=BOS, eos_token=EOS)
    hf.chat_template = template
    ferry = Tokenizer(raw, raw.token_to_id(BOS), (raw.token_to_id(EOS),), template, add_bos=True)
    return hf, ferry


def _hf_chat_ids(hf, messages) -> list[int]:
    out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


class _Engine:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


def _server_ids(tok) -> list[int]:
    body = protocol.ChatCompletionRequest(messages=MESSAGES)
    return _Handler(_Engine(tok), "m")._render_chat(body)


@pytest.mark.parametrize("template", [LLAMA3, CHATML], ids=["renders-bos", "no-bos"])
def test_chat_ids_match_transformers(template):
    hf, tok = _pair(template)
    bos = tok.bos_token_id
    want = _hf_chat_ids(hf, MESSAGES)
    assert tok.apply_chat_template(MESSAGES, tokenize=True) == want
    assert _server_ids(tok) == want
    assert want.count(bos) == (1 if template is LLAMA3 else 0)
    # positive control: the post-processor really adds BOS, so encoding the rendered text with
    # special tokens in transformers doubles it for the BOS-rendering template
    hf_text = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    if template is LLAMA3:
        assert hf.encode(hf_text)[:2] == [bos, bos]


def test_encode_never_doubles_bos():
    hf, tok = _pair(LLAMA3)
    bos = tok.bos_token_id
    text = tok.apply_chat_template(MESSAGES)
    assert text.startswith(BOS)
    ids = tok.encode(text)                                   # the LLM.chat -> add_request(text) path
    assert ids == _hf_chat_ids(hf, MESSAGES) and ids.count(bos) == 1
    assert tok.encode("plain")[:1] == [bos] and tok.encode("plain").count(bos) == 1   # still added when absent
    assert tok.encode("plain", add_special_tokens=False).count(bos) == 0
