"""Chat templates: rendered exactly as transformers' apply_chat_template renders them (same template, same
messages, same special tokens and kwargs), and sandboxed so templates cannot reach Python internals or files."""

from __future__ import annotations

import pytest

from pagoda_tokenizer.chat_template import ChatTemplate, ChatTemplateError
from pagoda_tokenizer.tokenizer import TextTokenizer
from tests.tokenizer_helpers import CHATML_TEMPLATE, byte_level_tokenizer_json, write_tokenizer_dir

# SmolLM2-Instruct's template: ChatML with a default system prompt.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-2 chat: bos_token/eos_token, raise_exception on bad turn order, string methods.
LLAMA2_TEMPLATE = """{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}\
{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}\
{% set system_message = false %}{% endif %}{% for message in loop_messages %}\
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
{% if loop.index0 == 0 and system_message != false %}\
{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}\
{% else %}{% set content = message['content'] %}{% endif %}\
{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}\
{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"""

# Qwen3-like: namespace, reversed slices, loop controls, whitespace control, a kwarg (enable_thinking).
QWEN3_LIKE_TEMPLATE = """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not message.content.startswith('<tool_response>') %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "system" and not loop.first %}{% continue %}{% endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}
    {%- if loop.index0 > ns.last_query_index %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# transformers' extras: tojson with its options, dict(), strftime_now, the {% generation %} tag.
EXTRAS_TEMPLATE = """{{ bos_token }}Today is {{ strftime_now('%Y') }}.
{% set meta = dict(count=messages|length, roles=messages|map(attribute='role')|list) %}{{ meta|tojson }}
{{ {'b': '<ü>', 'a': [1, 2]}|tojson(indent=2, sort_keys=true) }}
{% for message in messages %}{% if message.role == 'assistant' %}{% generation %}{{ message.content }}\
{% endgeneration %}{% else %}{{ message.content|tojson }}{% endif %}
{% endfor %}{% if add_generation_prompt %}>>{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2+2? "},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3 <&> \"quotes\" 你好 👍"}],
    [{"role": "user", "content": "<tool_response>x</tool_response>"}, {"role": "assistant", "content": "ok\n"},
     {"role": "user", "content": "next"}],
]
TEMPLATES = {"smollm2": SMOLLM2_TEMPLATE, "chatml": CHATML_TEMPLATE, "llama2": LLAMA2_TEMPLATE,
             "qwen3_like": QWEN3_LIKE_TEMPLATE, "extras": EXTRAS_TEMPLATE}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return write_tokenizer_dir(path, byte_level_tokenizer_json(), TEMPLATES[request.param],
                               bos_token="<|endoftext|>", eos_token="<|im_end|>")


def transformers_render(model_dir, messages, **kwargs):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def pagoda_template(model_dir) -> ChatTemplate:
    tokenizer = TextTokenizer.from_dir(model_dir)
    return ChatTemplate(tokenizer.chat_template, tokenizer.special_tokens)


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(model_dir, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    try:
        expected = transformers_render(model_dir, messages, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # the template refuses this conversation: so must we
        with pytest.raises(ChatTemplateError, match=str(exc)[:30]):
            pagoda_template(model_dir).render(messages, add_generation_prompt)
        return
    assert pagoda_template(model_dir).render(messages, add_generation_prompt) == expected


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_kwargs_reach_the_template_like_transformers(tmp_path, enable_thinking):
    model_dir = write_tokenizer_dir(tmp_path, byte_level_tokenizer_json(), QWEN3_LIKE_TEMPLATE)
    messages = CONVERSATIONS[0]
    expected = transformers_render(model_dir, messages, add_generation_prompt=True, enable_thinking=enable_thinking)
    rendered = pagoda_template(model_dir).render(messages, True, enable_thinking=enable_thinking)
    assert rendered == expected
    assert ("<think>" in rendered) is not enable_thinking


def test_raise_exception_becomes_a_chat_template_error(tmp_path):
    model_dir = write_tokenizer_dir(tmp_path, byte_level_tokenizer_json(), LLAMA2_TEMPLATE, bos_token="<s>")
    with pytest.raises(ChatTemplateError, match="must alternate"):
        pagoda_template(model_dir).render([{"role": "assistant", "content": "I go first"}])


def test_unknown_roles_are_refused():
    template = ChatTemplate(CHATML_TEMPLATE, {})
    with pytest.raises(ChatTemplateError, match="unknown role"):
        template.render([{"role": "root", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="unknown role"):
        template.render([{"role": "", "content": "hi"}])
    # A role the template itself names is known, after string constants with escapes too.
    assert "ipython" in ChatTemplate("{% if m == 'ipython' %}{% endif %}{{ messages[0].role }}", {}).render(
        [{"role": "ipython", "content": "x"}]
    )
    source = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}"
              "{% if m['role'] == 'observation' %}!{% endif %}{% endfor %}")
    assert ChatTemplate(source, {}).render([{"role": "observation", "content": "x"}]) == "<|observation|>\n!"


@pytest.mark.parametrize("source", ["{% if %}", "{{ x | no_such_filter }}", "{% for %}"])
def test_a_template_that_does_not_compile_is_a_chat_template_error(source):
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate(source, {})


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ cycler.__init__.__globals__.os.environ }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
    "{{ strftime_now.__code__.co_consts }}",
    "{{ dict.__call__.__func__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% set ns = namespace(__class__=1) %}",
    "{% set ns = namespace() %}{% set ns._secret = 1 %}",
    "{{ messages.append({'role': 'system', 'content': 'pwned'}) }}",
    "{{ messages[0].update({'content': 'pwned'}) }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}",
    "{{ self.__init__.__globals__ }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_blocks_escapes(source):
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source, {}).render([{"role": "user", "content": "hi"}])


def test_underscore_attributes_render_as_nothing():
    """Reading an unsafe attribute gives an undefined value; it prints as nothing, and using it fails."""
    rendered = ChatTemplate("[{{ messages.__class__ }}{{ ''.__doc__ }}]", {}).render([{"role": "user", "content": ""}])
    assert rendered == "[]"


# Escapes jinja's sandbox turns into undefined values: they must render as nothing at all.
SILENT_ESCAPES = [
    "{{ ''|attr('__class__') }}",
    "{{ '{0.__class__}'.format(messages) }}",
    "{{ '%s'|format(messages.__class__) }}",
    "{{ messages|map(attribute='__class__')|first }}",
    "{% set ns = namespace() %}{{ ns.__dict__ }}",
    "{{ lipsum.__globals__ }}{{ joiner.__init__ }}{{ dict.__class__ }}",
]


@pytest.mark.parametrize("source", SILENT_ESCAPES)
def test_sandbox_escapes_render_as_nothing(source):
    rendered = ChatTemplate(source, {}).render([{"role": "user", "content": "hi"}])
    assert rendered in ("", "Undefined"), rendered


# Template code that fails in ways other than jinja's own errors: each must be a ChatTemplateError (the
# service's INVALID_ARGUMENT), not an exception the service reports as UNKNOWN.
FAILING_TEMPLATES = [
    "{% extends '/etc/passwd' %}",
    "{% from 'os' import path %}",
    "{{ range(10**9)|length }}",  # the sandbox's range cap raises OverflowError
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",  # RecursionError
    "{{ messages|length / 0 }}",  # ZeroDivisionError
]


@pytest.mark.parametrize("source", FAILING_TEMPLATES)
def test_failing_template_code_is_a_chat_template_error(source):
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        ChatTemplate(source, {}).render([{"role": "user", "content": "hi"}])


def test_message_content_is_data_not_template_code():
    hostile = "{{ ''.__class__.__mro__ }}{% include '/etc/passwd' %}{{ 7 * 7 }}"
    rendered = ChatTemplate(CHATML_TEMPLATE, {}).render([{"role": "user", "content": hostile}])
    assert rendered == f"<|im_start|>user\n{hostile}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name", ["messages", "add_generation_prompt", "tools", "documents"])
def test_kwargs_cannot_replace_what_the_request_sets(name):
    with pytest.raises(ChatTemplateError, match=f"cannot set {name}"):
        ChatTemplate(CHATML_TEMPLATE, {}).render([{"role": "user", "content": "hi"}], True, **{name: 1})


def test_kwargs_named_like_python_parameters_do_not_break_rendering():
    # "self" once clashed with render()'s own parameter: a TypeError the service answered as UNKNOWN.
    template = ChatTemplate("{{ messages[0].content }}{{ flag }}", {})
    assert template.render([{"role": "user", "content": "hi"}], True, self="x", flag="!") == "hi!"
