"""Chat templates under a rendering budget (``evolm.chat_template``).

Hostile templates -- the kind a model file can ship -- are refused quickly with a
``TemplateBudgetError`` that names the template and the limit, instead of hanging or filling the
memory. Real templates render exactly as transformers renders them: SmolLM2's (from its GGUF,
when installed) and templates written here in the style of Llama 3.1, Gemma and Qwen 2.5, which
use what those families' templates use (``tojson(indent=4)``, ``strftime_now``, namespaces,
reversed history, ``loop.last``, ``raise_exception``, whitespace control).
"""

from __future__ import annotations

import time

import jinja2
import pytest

from evolm.chat_template import RenderBudget, TemplateBudgetError, compile_template
from evolm.tokenizer import TokenizerError

LLAMA31_STYLE = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You may call these functions:\\n\\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

GEMMA_STYLE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}
"""

QWEN25_STYLE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are helpful.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if message.role == "user" and ns.last_query == messages|length - 1 %}{%- set ns.last_query = index %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content.split('</think>')[-1].lstrip('\\n') if loop.index0 < ns.last_query else message.content %}
        {{- '<|im_start|>' + message.role + '\\n' + content }}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# what else templates reach for: loop attributes, filtered / recursive / else loops, filters
KITCHEN_SINK = """{% for m in messages if m.role != 'system' %}{{ loop.index }}/{{ loop.length }}{{ '!' if loop.last }}
{{ m.role|upper }}: {{ m.content|replace('a', 'A')|truncate(40) }} {{ loop.cycle('odd', 'even') }}
{% else %}none{% endfor %}
{{ messages|map(attribute='role')|join(', ') }} {{ messages|selectattr('role', 'equalto', 'user')|list|length }}
{% for k, v in {'b': 1, 'a': 2}|dictsort %}{{ k }}={{ v }};{% endfor %}
{% for item in [[1, [2, 3]], 4] recursive %}{% if item is iterable %}[{{ loop(item) }}]{% else %}{{ item }}{% endif %}{% endfor %}
{{ '%s-%03d'|format('x', 7) }} {{ '{}:{:>4}'.format('y', 8) }} {{ 2 ** 10 }} {{ 'ab' * 3 }} {{ [1] + [2] }}
{{ 'x' ~ 5 ~ none }} {{ 'line1\\nline2'|indent(2) }} {{ 'hi'|center(6) }}| {{ range(3)|sum }} {{ tools|tojson }}
{% macro tag(x) %}<{{ x }}>{% endmacro %}{{ tag('m') }} {% set block %}inner{{ 1 + 1 }}{% endset %}{{ block }}
{% generation %}kept{% endgeneration %}"""

CHATS = [
    [{"role": "user", "content": "Hi <b>there</b> & you"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  2+2?  "},
     {"role": "assistant", "content": "<think>add</think>\n4"}, {"role": "user", "content": "and 3+3 🤔"}],
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "a <b> & c",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "int"}}}}}]


def _reference(source: str):
    """transformers' own compiled template: what a model's users get from HF."""
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    return utils._compile_jinja_template(source)


def _variables(chat, gen, tools):
    return dict(messages=chat, add_generation_prompt=gen, tools=tools, bos_token="<s>", eos_token="</s>",
                date_string="26 Jul 2024")


@pytest.mark.parametrize("source", [LLAMA31_STYLE, GEMMA_STYLE, QWEN25_STYLE, KITCHEN_SINK],
                         ids=["llama3.1", "gemma", "qwen2.5", "kitchen-sink"])
def test_real_templates_render_exactly_as_transformers(source):
    ref = _reference(source)
    ours = compile_template(source)
    for chat in CHATS:
        for gen in (True, False):
            for tools in (None, TOOLS):
                want = ref.render(**_variables(chat, gen, tools))
                assert ours.render(**_variables(chat, gen, tools)) == want
    if source is GEMMA_STYLE:  # the template's own errors still come through
        with pytest.raises(jinja2.TemplateError, match="must alternate"):
            ours.render(**_variables([{"role": "assistant", "content": "x"}], True, None))


def test_smollm2_template_renders_as_transformers():
    """The template of a real model file, and the time a long conversation takes."""
    from evolm.interop.gguf import find_asset
    from evolm.interop.gguf_vocab import tokenizer_from_gguf

    try:
        source = tokenizer_from_gguf(find_asset("smollm2")).chat_template
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"the SmolLM2 GGUF is not installed ({e}); run `make models`")
    ref, ours = _reference(source), compile_template(source)
    long_chat = [{"role": ("user", "assistant")[i % 2], "content": "word " * 200} for i in range(200)]
    for chat in CHATS + [long_chat]:
        for gen in (True, False):
            assert ours.render(messages=chat, add_generation_prompt=gen) == \
                ref.render(messages=chat, add_generation_prompt=gen)


# each of these ran for minutes or passed gigabytes before the budget
HOSTILE = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "repeated 100 kB string": "{% set s = 'x' * 100000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
    "one huge repeat": "{{ 'x' * 10**10 }}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "doubling a list": "{% set ns = namespace(s=[1]) %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "output in a macro": "{% macro m() %}{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}{% endmacro %}"
                         "{% set s = m() %}ok",
    "template text in a loop": "{% for i in range(100000) %}" + "L" * 1000 + "{% endfor %}",
    "padding filter": "{{ 'x'|center(1000000000) }}",
    "padding method": "{{ 'x'.ljust(1000000000) }}",
    "format width": "{{ '%0999999999d' % 1 }}",
    "format width from an argument": "{{ '{:>{}}'.format(1, 999999999) }}",
    "join of repeats": "{% set l = ['x' * 1000000] * 1000 %}{{ l|join }}",
    "replace growth": "{{ ('a' * 100000)|replace('a', 'b' * 1000) }}",
    "translate growth": "{{ ('a' * 100000).translate({97: 'b' * 1000}) }}",
    "many medium values": "{{ range(100000)|map('center', 1000000)|list|length }}",
    "huge integer": "{{ 7 ** 100000000 }}",
    "integer squaring": "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}"
                        "{% endfor %}{{ 1 }}",
    "lipsum": "{{ lipsum(1000000) }}",
    "infinite recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "exponential recursion": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                             "{{ f(40) }}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_templates_are_refused_quickly(name):
    budget = RenderBudget(seconds=0.5)
    t = time.monotonic()
    with pytest.raises(TemplateBudgetError, match=r"chat template \(\d+ chars, sha256 \w+.*exceeds its rendering "
                                                  r"budget: .*(\(RenderBudget\.\w+=|recursion limit)"):
        compile_template(HOSTILE[name], budget).render(messages=[{"role": "user", "content": "hi"}])
    assert time.monotonic() - t < 3.0


def test_budget_is_per_render_and_a_tokenizer_error():
    """A template near a limit renders every time (budgets do not accumulate across renders),
    a request that pushes it over fails alone, and the error is a TokenizerError."""
    t = compile_template("{% for m in messages %}{{ m.content }}{% endfor %}", RenderBudget(chars=1000))
    small = [{"role": "user", "content": "x" * 900}]
    for _ in range(5):
        assert len(t.render(messages=small)) == 900
    with pytest.raises(TokenizerError, match="output longer than 1000 characters"):
        t.render(messages=small * 2)
    assert len(t.render(messages=small)) == 900


def test_syntax_errors_still_name_the_template():
    with pytest.raises(TokenizerError, match=r"chat template \(.*does not parse"):
        compile_template("{% for %}")
