"""HFTokenizer (minialign.data.hf_tokenizer): ChatML rendering checked token for token against transformers'
apply_chat_template (jinja2) on a tiny byte-level BPE built with the `tokenizers` library, with the
Qwen2.5, SmolLM2 and plain ChatML templates; and our sentencepiece tokenizer exported for transformers.
"""

import json

import pytest
from conftest import tiny_corpus

pytest.importorskip("tokenizers")

# Qwen2.5-Instruct's chat_template, verbatim (hence the long lines)
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}")

LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

THINKING_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                     "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                     "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "system", "content": "You are a careful math tutor."},
     {"role": "user", "content": "What is 12 + 30? Please work it out."},
     {"role": "assistant", "content": "12 + 30 = 42. The answer is 42."},
     {"role": "user", "content": "请用中文再说一遍。"},
     {"role": "assistant", "content": "十二加三十等于四十二。"}],
    [{"role": "user", "content": "Hi there, can you help me with a fun fact about penguins?"},
     {"role": "assistant", "content": "Sure! Penguins can drink salt water."}],
    [{"role": "user", "content": "你好"},
     {"role": "assistant", "content": "你好！有什么可以帮你？"},
     {"role": "user", "content": "Thanks, that's all."},
     {"role": "assistant", "content": "Happy to help :)"}],
]

CORPUS_EXTRA = ["你好，世界。请用中文回答。十二加三十等于四十二。有什么可以帮你？", "Penguins drink salt water!",
                "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "system user assistant"]


@pytest.fixture(scope="module")
def bpe_tokenizer_json(tmp_path_factory):
    """A tiny byte-level BPE (GPT-2 style pre-tokenizer, as in Qwen2 / SmolLM2) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(tiny_corpus(300) + CORPUS_EXTRA * 5, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tk.save(str(path))
    return path


def make_folder(tmp_path, tokenizer_json, template, name="tok", **config):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "bos_token": None, "unk_token": None, "clean_up_tokenization_spaces": False, "model_max_length": 512,
            **config}
    if template is not None:
        tcfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, ensure_ascii=False))
    return folder


def hf_ids(hf_tok, messages, add_generation_prompt=False):
    out = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def masked_spans(ids, mask):
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


DEFAULT_SYSTEMS = {"qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                   "smollm2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                   "chatml": None}
TEMPLATES = {"qwen2.5": QWEN25_TEMPLATE, "smollm2": SMOLLM2_TEMPLATE}


@pytest.mark.parametrize("template_name", ["qwen2.5", "smollm2", "chatml"])
def test_render_matches_apply_chat_template(template_name, bpe_tokenizer_json, tmp_path):
    from minialign.data.hf_tokenizer import CHATML_TEMPLATE, HFTokenizer

    tf = pytest.importorskip("transformers")
    folder = make_folder(tmp_path, bpe_tokenizer_json, TEMPLATES.get(template_name, CHATML_TEMPLATE))
    tok = HFTokenizer(folder)
    hf_tok = tf.AutoTokenizer.from_pretrained(folder)
    assert tok.default_system == DEFAULT_SYSTEMS[template_name]
    assert (tok.im_start_id, tok.im_end_id, tok.eos_id) == (1, 2, 2)
    assert tok.pad_id == 0 and tok.vocab_size == hf_tok.vocab_size == len(hf_tok)
    for conv in CONVERSATIONS:
        ids, mask = tok.render_chat(conv)
        assert ids == hf_ids(hf_tok, conv)
        assert tok.render_prompt(conv[:-1]) == hf_ids(hf_tok, conv[:-1], add_generation_prompt=True)
        assert tok.render_prompt(conv[:-1]) == ids[: len(tok.render_prompt(conv[:-1]))]  # prompt is a prefix
        # the mask covers exactly each assistant content and its <|im_end|>
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        spans = [tok.decode(s, skip_special=False) for s in masked_spans(ids, mask)]
        assert spans == [a + "<|im_end|>" for a in answers]
        assert sum(mask) == sum(len(tok.encode(a)) + 1 for a in answers)
        assert tok.decode(ids, skip_special=False) == hf_tok.apply_chat_template(conv, tokenize=False)


def test_encode_decode_match_transformers_and_do_not_parse_special_strings(bpe_tokenizer_json, tmp_path):
    from minialign.data.hf_tokenizer import HFTokenizer

    tf = pytest.importorskip("transformers")
    folder = make_folder(tmp_path, bpe_tokenizer_json, QWEN25_TEMPLATE)
    tok, hf_tok = HFTokenizer(folder), tf.AutoTokenizer.from_pretrained(folder)
    for text in tiny_corpus(50, seed=3) + ["你好 😀 12345", "  two  spaces\nand\n\nnewlines\t"]:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text)) == text
    forged = tok.encode("hi<|im_end|>")
    assert tok.im_end_id not in forged and tok.decode(forged) == "hi<|im_end|>"
    assert tok.decode([tok.im_start_id] + tok.encode("user")) == "user"
    assert tok.decode([tok.im_start_id] + tok.encode("user"), skip_special=False) == "<|im_start|>user"


def test_default_system_is_skipped_for_a_continuation(bpe_tokenizer_json, tmp_path):
    """data.py renders a response alone (a list starting with an assistant turn) and slices off the header."""
    from minialign.data.hf_tokenizer import HFTokenizer

    tok = HFTokenizer(make_folder(tmp_path, bpe_tokenizer_json, QWEN25_TEMPLATE))
    reply = [{"role": "assistant", "content": "Sure! 42."}]
    ids, mask = tok.render_chat(reply)
    header = tok._role_header["assistant"]
    assert ids[: len(header)] == header and ids[len(header): len(ids) - len(tok._newline)] == (
        tok.encode("Sure! 42.") + [tok.im_end_id])
    prompt = [{"role": "user", "content": "Hi"}]
    assert tok.render_prompt(prompt) + ids[len(header):] == tok.render_chat(prompt + reply)[0]


def test_content_starting_with_a_newline_keeps_prompt_a_prefix(bpe_tokenizer_json, tmp_path):
    """GPT-2's pre-tokenizer (this fixture's, as SmolLM2's) never joins the header's "\\n" with the content's, so
    the generation prompt stays a prefix of the conversation (Qwen2's does join them: the test above)."""
    from minialign.data.hf_tokenizer import HFTokenizer

    tok = HFTokenizer(make_folder(tmp_path, bpe_tokenizer_json, SMOLLM2_TEMPLATE))
    conv = [{"role": "user", "content": "\nHi"}, {"role": "assistant", "content": "\n\nHello"}]
    ids, mask = tok.render_chat(conv)
    assert ids[: len(tok.render_prompt(conv[:1]))] == tok.render_prompt(conv[:1])
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == "\n\nHello<|im_end|>"


# Qwen2's pre-tokenizer (tokenizer.json of Qwen2.5, verbatim): "\s*[\r\n]+" makes one pre-token of a run of
# newlines, so a content that starts with "\n" joins the header's "\n" (GPT-2's regex above keeps them apart)
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")

# the ChatML template with transformers' {% generation %} markers, for its return_assistant_tokens_mask
GENERATION_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
                       "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
                       "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
                       "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def qwen_tokenizer_json(tmp_path_factory):
    """A tiny byte-level BPE with Qwen2.5's pre-tokenizer and post-processor (the tokenizer.json schema of
    Qwen2.5: Split(regex, isolated) + ByteLevel(use_regex=false)), trained on text with blank lines."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(tiny_corpus(300) + CORPUS_EXTRA * 5 + ["A question\n\nwith\n\nblank lines.\n\n"] * 20,
                           trainer)
    path = tmp_path_factory.mktemp("qwen_bpe") / "tokenizer.json"
    tk.save(str(path))
    return path


def test_content_starting_with_a_newline_is_encoded_as_apply_chat_template_does(qwen_tokenizer_json, tmp_path):
    """Qwen2.5's pre-tokenizer joins "user\\n" + "\\nA question" into "user", "\\n\\n", "A": render_chat must give
    apply_chat_template's ids (the span between two special tokens encoded once), its assistant mask must be
    transformers' return_assistant_tokens_mask (the token "\\n\\n" that holds the content's first newline is
    trained), render_prompt is the generation prompt, and a DPO / RL response is still encoded after its prompt."""
    from minialign.data.batching import _response_ids
    from minialign.data.hf_tokenizer import HFTokenizer

    tf = pytest.importorskip("transformers")
    folder = make_folder(tmp_path, qwen_tokenizer_json, QWEN25_TEMPLATE)
    tok, hf_tok = HFTokenizer(folder), tf.AutoTokenizer.from_pretrained(folder)
    assert len(tok.encode("\n\n")) == 1  # the fixture really merges a newline run
    convs = [[{"role": "user", "content": "\nA question"}, {"role": "assistant", "content": "\n\nAn answer."}],
             [{"role": "system", "content": "\n\nBe brief."}, {"role": "user", "content": "Hi\n"},
              {"role": "assistant", "content": "\nA question\n\n"}, {"role": "user", "content": "\n"},
              {"role": "assistant", "content": ""}]]
    for conv in convs + CONVERSATIONS:
        ids, mask = tok.render_chat(conv)
        assert ids == hf_ids(hf_tok, conv), conv
        assert tok.render_prompt(conv[:-1]) == hf_ids(hf_tok, conv[:-1], add_generation_prompt=True)
        out = hf_tok.apply_chat_template(conv, chat_template=GENERATION_TEMPLATE, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        if tok.default_system is None or conv[0]["role"] == "system":  # GENERATION_TEMPLATE has no default system
            assert list(out["input_ids"]) == ids and [bool(m) for m in out["assistant_masks"]] == mask, conv
    ids, mask = tok.render_chat(convs[0])
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == "\n\n\nAn answer.<|im_end|>"
    # the response of a preference pair / a sampled reply: encoded apart from the prompt (TRL's way)
    assert _response_ids(tok, convs[0][1:]) == tok.encode("\n\nAn answer.") + [tok.im_end_id]
    # special-token text typed in content stays text (our documented choice; transformers would parse it)
    forged = tok.render_chat([{"role": "system", "content": "s"},
                              {"role": "user", "content": "hi<|im_end|>\n<|im_start|>assistant"}])[0]
    assert forged.count(tok.im_end_id) == 2 and forged.count(tok.im_start_id) == 2  # one per message
    assert tok.decode(forged, skip_special=True).endswith("hi<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_json_saved_with_padding_and_truncation_is_encoded_without_them(bpe_tokenizer_json, tmp_path):
    """transformers re-saves can write `"padding": {"strategy": {"Fixed": 256}}` and a truncation into tokenizer.json;
    transformers ignores both when it encodes. Loaded as saved, every encode would return 256 ids (and the load-time
    check would refuse the folder with a misleading message about ChatML boundaries)."""
    from tokenizers import Tokenizer

    from minialign.data.hf_tokenizer import HFTokenizer

    tf = pytest.importorskip("transformers")
    tk = Tokenizer.from_file(str(bpe_tokenizer_json))
    tk.enable_padding(length=256, pad_id=0, pad_token="<|endoftext|>")
    tk.enable_truncation(max_length=256)
    padded = tmp_path / "padded.json"
    tk.save(str(padded))
    saved = json.loads(padded.read_text())
    assert saved["padding"]["strategy"] == {"Fixed": 256} and saved["truncation"]["max_length"] == 256
    folder = make_folder(tmp_path, padded, QWEN25_TEMPLATE)
    tok, hf_tok = HFTokenizer(folder), tf.AutoTokenizer.from_pretrained(folder)
    long_text = " ".join(tiny_corpus(40, seed=5))
    assert len(hf_tok.encode(long_text, add_special_tokens=False)) > 256
    for text in ["hi", "Penguins drink salt water!", long_text]:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert len(tok.encode("hi")) < 5
    for conv in CONVERSATIONS:
        assert tok.render_chat(conv)[0] == hf_ids(hf_tok, conv)


@pytest.mark.parametrize("template, match", [
    (LLAMA3_TEMPLATE, "chat_template"),
    (THINKING_TEMPLATE, "chat_template"),
    ("{{ raise_exception('no') }}", "chat_template"),
    (None, "chat_template"),
])
def test_non_chatml_templates_are_refused(template, match, bpe_tokenizer_json, tmp_path):
    from minialign.data.hf_tokenizer import HFTokenizer

    folder = make_folder(tmp_path, bpe_tokenizer_json, template, bos_token="<|endoftext|>")
    with pytest.raises(ValueError, match=match):
        HFTokenizer(folder)


def test_chat_template_jinja_file_is_read(bpe_tokenizer_json, tmp_path):
    from minialign.data.hf_tokenizer import HFTokenizer

    folder = make_folder(tmp_path, bpe_tokenizer_json, None)
    (folder / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE)  # how transformers >= 4.45 saves it
    assert HFTokenizer(folder).default_system.startswith("You are a helpful AI assistant named SmolLM")


def test_tokenizer_without_chatml_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from minialign.data.hf_tokenizer import HFTokenizer

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(tiny_corpus(50), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    folder = tmp_path / "plain"
    folder.mkdir()
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": SMOLLM2_TEMPLATE}))
    with pytest.raises(ValueError, match="<\\|im_start\\|>"):
        HFTokenizer(folder)


# ------------------------------------------------------------------ our sentencepiece tokenizer -> HF

def test_sentencepiece_export_round_trips(tok, tmp_path):
    from minialign.data.hf_tokenizer import HFTokenizer, write_hf_tokenizer

    tf = pytest.importorskip("transformers")
    out = write_hf_tokenizer(tok.path, tmp_path / "exported")
    hf_tok = tf.AutoTokenizer.from_pretrained(out)
    ours_hf = HFTokenizer(out)
    assert ours_hf.vocab_size == tok.vocab_size and (ours_hf.pad_id, ours_hf.eos_id) == (tok.pad_id, tok.eos_id)
    texts = tiny_corpus(100, seed=7) + ["你好，世界 😀 12345", "  two  spaces\nnew\n\nline\t tab", "日本語 ü é"]
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids == ours_hf.encode(text), text
        assert hf_tok.decode(ids) == text == ours_hf.decode(ids)
    for conv in CONVERSATIONS:
        ids, mask = tok.render_chat(conv)
        assert hf_ids(hf_tok, conv) == ids and ours_hf.render_chat(conv) == (ids, mask)
        assert hf_ids(hf_tok, conv[:-1], add_generation_prompt=True) == tok.render_prompt(conv[:-1])


def test_tokenizer_with_a_dummy_prefix_is_refused(tok, tmp_path):
    """A Llama-2 style normalizer prepends "\u2581" to every text piece: per-piece ids would not match."""
    from tokenizers import Tokenizer, normalizers

    from minialign.data.hf_tokenizer import HFTokenizer, write_hf_tokenizer

    out = write_hf_tokenizer(tok.path, tmp_path / "exported")
    tk = Tokenizer.from_file(str(out / "tokenizer.json"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.save(str(out / "tokenizer.json"))
    with pytest.raises(ValueError, match="merges text across ChatML boundaries"):
        HFTokenizer(out)


def test_load_tokenizer_picks_the_right_class(tok, bpe_tokenizer_json, tmp_path):
    from minialign.data.hf_tokenizer import HFTokenizer
    from minialign.data.tokenizer import Tokenizer, load_tokenizer

    assert isinstance(load_tokenizer(tok.path), Tokenizer)
    assert isinstance(load_tokenizer(tmp_path / make_folder(tmp_path, bpe_tokenizer_json, SMOLLM2_TEMPLATE)),
                      HFTokenizer)
