"""A base model's chat template, used the way that model wants: where the persona's system prompt goes, and what a
template's refusal means in words.

Catalogue templates disagree about the system role. SmolLM2, Qwen2.5, Llama 3.2 and Phi-3.5 render it as its own
block; Gemma 2 raises "System role not supported"; Mistral v0.3 shows it only inside the *last* user turn, and only
when the conversation ends with that turn, so a training example (which ends with the reply) would lose it and its
prefix would render differently from the whole (which is what made every example fail the masking check). Where the
template does not keep the system message as a block in front of the first turn, the persona's instructions are
folded into the first user turn instead: the same place for every prefix of the conversation, in training and chat.

Which templates need that is found by rendering a small probe conversation, not from a list of model names, so a
model that is not in the catalogue is handled the same way. tests/core/test_templates.py checks each catalogue
family's real template (tests/data/chat_templates/).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from app.core.errors import ModelError

Messages = list[dict[str, str]]

_SYSTEM_PROBE = "TAILOR-SYSTEM-PROBE"
_USER_PROBE = "TAILOR-USER-PROBE"


class ChatTemplateError(ModelError):
    """The base model's chat template refused a conversation."""


def model_label(tokenizer) -> str:
    """The model's name for messages: its hub id where the folder records one, else the folder's name."""
    from app.core.models import folder_model_id

    source = str(getattr(tokenizer, "name_or_path", "") or "")
    folder = Path(source)
    if source and (folder / "config.json").is_file():
        return folder_model_id(folder)
    return source or "this model"


def render(tokenizer, messages: Messages, **options):
    """`tokenizer.apply_chat_template`, with a refusal by the template (roles out of order, an unsupported role…)
    turned into a ChatTemplateError naming the model and what to do."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, **options)
    except TemplateError as exc:
        reason = str(exc).strip() or type(exc).__name__
        if "alternate" in reason:
            hint = ("Make the conversation alternate user and assistant turns, starting with the user (merge "
                    "consecutive messages from the same side), or pick another base model.")
        else:
            hint = "Pick another base model, or rewrite the conversation so that this template accepts it."
        raise ChatTemplateError(f"The chat template of {model_label(tokenizer)} refused the conversation: {reason}",
                                hint) from exc


def keeps_system_role(tokenizer) -> bool:
    """Whether the template renders a leading system message as such, in front of the first user turn, both for a
    conversation waiting for a reply and for one that ends with the reply (a training example)."""
    return _keeps_system_role(tokenizer.chat_template or "", _special_tokens(tokenizer))


def _special_tokens(tokenizer) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((key, str(value)) for key, value in tokenizer.special_tokens_map.items() if isinstance(value, str)))


@lru_cache(maxsize=32)
def _keeps_system_role(template: str, special_tokens: tuple[tuple[str, str], ...]) -> bool:
    from transformers.utils.chat_template_utils import render_jinja_template

    system = {"role": "system", "content": _SYSTEM_PROBE}
    user = {"role": "user", "content": _USER_PROBE}
    reply = {"role": "assistant", "content": "Reply."}
    try:
        renders = [render_jinja_template([conversation], chat_template=template, add_generation_prompt=prompt,
                                         **dict(special_tokens))[0][0]
                   for conversation, prompt in (([system, user], True), ([system, user, reply], False))]
    except Exception:  # any refusal (Gemma 2 raises) means the system message cannot stand as its own block
        return False
    return all(0 <= text.find(_SYSTEM_PROBE) < text.find(_USER_PROBE) for text in renders)


def place_system_prompt(tokenizer, messages: Messages) -> Messages:
    """The conversation as this template should get it: a leading system message stays where the template keeps
    one, and is otherwise folded into the first user turn (a blank line between them)."""
    if not messages or messages[0]["role"] != "system" or keeps_system_role(tokenizer):
        return messages
    system, rest = messages[0]["content"], messages[1:]
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def prompt_ids(tokenizer, messages: Messages) -> list[int]:
    """A conversation waiting for its reply as the token ids the model reads: this template, with the system prompt
    placed where it keeps one (place_system_prompt), and the generation prompt."""
    return list(render(tokenizer, place_system_prompt(tokenizer, messages), add_generation_prompt=True, tokenize=True,
                       return_dict=True)["input_ids"])
