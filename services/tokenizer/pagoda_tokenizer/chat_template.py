"""Chat templates rendered as transformers' apply_chat_template renders them, in a jinja2 sandbox.

A model's chat template is code from the model's author and the messages come from users, so the template
runs in an ImmutableSandboxedEnvironment: no file loader, no underscore attributes, no mutation of the
messages, and only the globals transformers provides (raise_exception, strftime_now, dict, namespace) plus
its tojson filter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Roles any template is assumed to accept; others must appear as a string literal in the template.
STANDARD_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
# Template variables the renderer sets itself; chat_template_kwargs may not override them.
RESERVED_VARIABLES = frozenset({"messages", "add_generation_prompt", "tools", "documents"})


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered: a bad role, the template refused it (raise_exception), or the
    template does not compile."""


class ChatTemplate:
    def __init__(self, source: str, special_tokens: Mapping[str, str]):
        """Raises ChatTemplateError when the template does not compile."""
        environment = _environment()
        try:
            syntax_tree = environment.parse(source)
            self._template = environment.from_string(syntax_tree)
        except jinja2.TemplateError as exc:  # a syntax error, an unknown filter or test, ...
            raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc
        # Passed to every render like transformers' special_tokens_map: bos_token, eos_token, ...
        self._special_tokens = dict(special_tokens)
        self._known_roles = STANDARD_ROLES | _string_constants(syntax_tree)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, /, **kwargs: Any) -> str:
        # Positional-only above, so that a caller's kwargs named "messages" or "self" reach the check below
        # instead of clashing with the parameters (a TypeError, which the service answered as UNKNOWN).
        reserved = sorted(RESERVED_VARIABLES & kwargs.keys())
        if reserved:
            raise ChatTemplateError(f"chat_template_kwargs cannot set {', '.join(reserved)}: the request sets them")
        for message in messages:
            self._check_role(message.get("role", ""))
        # The caller's kwargs win over the special tokens, as in transformers. One dict, not keywords: jinja's
        # render() has a parameter named self too.
        variables = {**self._special_tokens, **kwargs, "messages": messages, "tools": None, "documents": None,
                     "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(variables)
        except Exception as exc:  # noqa: BLE001 - whatever the template's code raises, the request cannot render
            # TemplateError covers raise_exception and sandbox violations; TypeError and ValueError come from
            # template code given values it does not expect (e.g. a kwarg of the wrong type); OverflowError from
            # the sandbox's range limit; RecursionError, ZeroDivisionError, ... from template code of any kind.
            # Any of them escaping would reach the client as UNKNOWN with a traceback in the log.
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def _check_role(self, role: str) -> None:
        if role not in self._known_roles:
            known = ", ".join(sorted(STANDARD_ROLES))
            raise ChatTemplateError(f"unknown role {role!r}: use one of {known} or a role the chat template names")


def _environment() -> ImmutableSandboxedEnvironment:
    # trim_blocks, lstrip_blocks and loopcontrols are what transformers enables; templates are written for them.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change what the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict`` for templates without handing them the type itself (whose attributes reach Python internals)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace that refuses underscore-prefixed names, so templates cannot plant dunders on it."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # No named `self`, as in jinja2's Namespace: templates may pass `self=...` as an attribute.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body: transformers uses the tag to find the
    assistant's tokens for training masks, which serving does not need."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _string_constants(syntax_tree: jinja2.nodes.Template) -> frozenset[str]:
    return frozenset(node.value for node in syntax_tree.find_all(jinja2.nodes.Const) if isinstance(node.value, str))
