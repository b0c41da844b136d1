"""Tokenizer, chat template and incremental detokenizer: parity with HF transformers on the default model."""
import os

import pytest

from ferry.models.registry import default_model_path

TEXTS = ["Hello world!", "The capital of France is Paris.", "def f(x):\n    return x * x\n\n",
         "  leading spaces and\ttabs\n\nnew lines    ", "naïve café — “quotes” ü", "日本語のテキストと中文", "emoji 🚀🔥 ok 👩‍👩‍👧",
         "<|im_start|>user\nhi<|im_end|>\n", "MixedCASE snake_case kebab-case CamelCase", "a" * 50,
         "x = {'k': [1.5, -2e3]}  # comment", ""]


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_tokenizer_matches_hf(default_bundle, hf_tokenizer):
    tok = default_bundle.tokenizer
    assert tok.vocab_size == len(hf_tokenizer) == 49152
    assert tok.bos_token_id == hf_tokenizer.bos_token_id and tok.eos_token_ids == (hf_tokenizer.eos_token_id,)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids) == text, text
        assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True), text
    special = tok.encode("<|im_start|>assistant<|im_end|>")
    assert special[0] == 1 and special[-1] == 2 and tok.decode(special) == "assistant"


def test_encode_adds_bos_only_when_the_model_says_so(default_bundle):
    tok = default_bundle.tokenizer
    assert not tok.add_bos and tok.encode("hi") == tok.encode("hi", add_special_tokens=False)
    from ferry.models.tokenizer import Tokenizer
    with_bos = Tokenizer(tok._tok, tok.bos_token_id, tok.eos_token_ids, add_bos=True)
    assert with_bos.encode("hi") == [tok.bos_token_id] + tok.encode("hi")
    with pytest.raises(ValueError, match="string"):
        tok.encode(["not", "text"])


def test_digits_split_one_by_one_like_smollm2(default_bundle):
    """llama.cpp's "smollm" pre-tokenizer (and SmolLM2's tokenizer.json) split numbers into digits;
    transformers' GGUF path does not know "smollm" and keeps GPT-2 number chunks, so we differ there."""
    tok = default_bundle.tokenizer
    ids = tok.encode("12345")
    assert [tok.decode([i]) for i in ids] == list("12345")


def test_save_and_from_dir_round_trip(tmp_path, default_bundle):
    transformers = pytest.importorskip("transformers")
    from ferry.models.tokenizer import Tokenizer
    tok = default_bundle.tokenizer
    tok.save(str(tmp_path))
    back = Tokenizer.from_dir(str(tmp_path))
    assert (back.bos_token_id, back.eos_token_ids, back.add_bos, back.vocab_size) == \
        (tok.bos_token_id, tok.eos_token_ids, tok.add_bos, tok.vocab_size)
    assert back.chat_template == tok.chat_template
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in TEXTS + ["1234567 and 3.14159"]:
        assert back.encode(text) == tok.encode(text) == fast.encode(text, add_special_tokens=False), text
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_dir(str(tmp_path / "nowhere"))
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot parse"):
        Tokenizer.from_dir(str(tmp_path))


def test_chat_template_matches_transformers(default_bundle, hf_tokenizer):
    convs = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Colors?"}],
             [{"role": "user", "content": "日本語 🚀"}, {"role": "assistant", "content": "はい"}]]
    tok = default_bundle.tokenizer
    for m in convs:
        for gen in (True, False):
            ours = tok.apply_chat_template(m, add_generation_prompt=gen)
            assert ours == hf_tokenizer.apply_chat_template(m, add_generation_prompt=gen, tokenize=False)
            assert tok.apply_chat_template(m, add_generation_prompt=gen, tokenize=True) == tok.encode(ours)
    for bad in ([{"content": "no role"}], "not a list", [], [{"role": "user", "content": 5}]):
        with pytest.raises(ValueError):
            tok.apply_chat_template(bad)


def test_chat_template_semantics_match_transformers(hf_tokenizer):
    """Whitespace control (trim/lstrip blocks), loop controls, tojson, bos/eos, extra kwargs, raise_exception."""
    from ferry.models.chat_template import render
    tpl = ("{{ bos_token }}\n{% for m in messages %}\n  {% if loop.index > 3 %}{% break %}{% endif %}\n"
           "  {{ m['role'] }}={{ m['content'] | tojson }}{{ eos_token }}\n{% endfor %}\n"
           "{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}{% if add_generation_prompt %}>{% endif %}")
    msgs = [{"role": "user", "content": "é\"q 🚀"}, {"role": "assistant", "content": "a\nb"}] * 3
    tools = [{"name": "f", "parameters": {"x": "ü"}}]
    for gen in (True, False):
        ref = hf_tokenizer.apply_chat_template(msgs, chat_template=tpl, add_generation_prompt=gen, tokenize=False,
                                               tools=tools)
        ours = render(tpl, msgs, add_generation_prompt=gen, bos_token=hf_tokenizer.bos_token,
                      eos_token=hf_tokenizer.eos_token, tools=tools)
        assert ours == ref
    boom = "{% if x %}{{ raise_exception('boom') }}{% endif %}ok"
    assert render(boom, msgs) == "ok"
    with pytest.raises(ValueError, match="boom"):
        render(boom, msgs, x=True)
    assert render("{{ strftime_now('%Y') }}", msgs).isdigit()
    with pytest.raises(ValueError):                          # the sandbox refuses attribute games
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}", msgs)


def test_incremental_detokenizer_streams_multibyte_text(default_bundle):
    from ferry.models.detokenizer import IncrementalDetokenizer
    tok = default_bundle.tokenizer
    texts = ("emoji 🚀🔥 and 日本語 mixed", "plain words only", "ü ñ ç", "👩‍👩‍👧 family", "中文字符测试", "  spaced  out ")
    for text in texts:
        ids = tok.encode(text)
        d = IncrementalDetokenizer(tok)
        deltas = [d.add(i) for i in ids] + [d.flush()]
        assert "".join(deltas) == tok.decode(ids) == text
        assert not any("\ufffd" in x for x in deltas)
    multi = [i for i in tok.encode("🚀") if "\ufffd" in tok.decode([i])]
    assert multi, "the emoji should span several byte-level tokens"
    d = IncrementalDetokenizer(tok)
    assert d.add(multi[0]) == ""                            # half a character is held back ...
    assert d.flush() == tok.decode([multi[0]])              # ... and flushed as-is at the end
