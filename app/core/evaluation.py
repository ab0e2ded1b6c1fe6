"""The report card: how a persona compares with its base model on prompts it did not learn from.

It takes a loaded ChatSession (the base, and the persona opened in it) and a prompt set, and returns plain data
(`ReportCard`); the CLI and the GUI only render it. For each held-out prompt the base and the persona answer with the
chat engine's default settings and a fixed seed, so the card is reproducible, and both get the persona's system
prompt, so every difference comes from the adapter alone. The card holds:

- replies side by side, each marked for style, loops and topic;
- held-out loss and perplexity of base vs persona on the held-out examples' reference replies (assistant tokens only);
- style k/n: how many persona replies read like the persona's training replies rather than like the base model:
  they use the persona's signature words, or its character patterns (see `StyleJudge`); the same test on the
  base's replies gives the base's own score, the floor to beat;
- loops: replies that repeat themselves (see `loops`);
- on topic: replies that the base model finds likelier after their own question than after any other on the card
  (see `TopicJudge`);
- knowledge: short general questions shipped in resources/eval/knowledge.jsonl, answered greedily by base and
  persona and scored by accepted keywords, so a persona that forgot what the base knew is caught.

Nothing at import time loads torch, so the library panel can summarise saved cards instantly.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from app.core.chat import BASE, ChatSession, GenerationSettings, StopFlag
from app.core.data import Messages, load_dataset_file, tokenize_conversation, with_system_prompt
from app.core.errors import DatasetError, TailorError
from app.core.heldout import read_heldout
from app.core.library import AdapterEntry, Library
from app.core.paths import resources_dir

CARD_KEY = "report_card"
"""Where the card is kept in the adapter's manifest (tailor.json), so it travels with the adapter and its bundles."""
CARD_VERSION = 2
"""2: the topic judge ranks questions by likelihood, the style judge also counts signature words."""
EVAL_SEED = 0
"""Every reply on the card is sampled from this seed: the same adapter gives the same card."""
REPLY_TOKENS = 160
"""Reply length cap for held-out prompts: enough to show a loop or a drift off topic, short enough for a CPU."""
KNOWLEDGE_TOKENS = 48
"""The knowledge questions want a word or a number; the keyword appears early or not at all."""
KNOWLEDGE_TEMPERATURE = 0.0
"""The knowledge questions are answered greedily: the check asks what a model knows, its most likely answer, and
one draw at chat's temperature is too noisy for ten questions (a pirate persona's draws at seeds 0-4 scored 3, 7,
9, 7 and 6 of 10, its base's 7, 3, 5, 5 and 3; greedily, 7 and 7)."""
HELD_OUT_FRACTION = 0.1
MAX_PROMPTS = 12
LOSS_MAX_LEN = 1024

Progress = Callable[[str], None]


class EvaluationStopped(TailorError):
    """The user stopped the evaluation (closed the card); nothing was saved."""


# The prompts


@dataclass(frozen=True)
class EvalPrompt:
    messages: Messages
    """The conversation up to the user turn to answer (no system prompt: the persona's is added when asked)."""
    reference: str | None = None
    """The dataset's reply to it, when the prompt comes from a dataset; what the held-out loss is measured on."""

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]


def prompts_from_file(path: str | Path) -> list[EvalPrompt]:
    """Prompts from a chat dataset (any format the trainer reads; the last reply of each conversation becomes the
    reference) or from a plain text file, one question per line."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DatasetError(f"The prompts file {path} does not exist.", hint="Check the path.")
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        prompts = [EvalPrompt([{"role": "user", "content": line}]) for line in lines if line]
    else:
        prompts = [_split_last_reply(conversation) for conversation in load_dataset_file(path).conversations]
    if not prompts:
        raise DatasetError(f"{path.name} holds no prompts.", hint="Give one question per line, or a chat dataset.")
    return prompts


def _split_last_reply(conversation: Messages) -> EvalPrompt:
    last = max(index for index, message in enumerate(conversation) if message["role"] == "assistant")
    asked = [message for message in conversation[:last] if message["role"] != "system"]
    return EvalPrompt(asked, conversation[last]["content"])


def training_entry(library: Library, entry: AdapterEntry) -> AdapterEntry:
    """The adapter whose training data speaks for this one: itself, or for a mix the parent it weighs most."""
    manifest = entry.manifest or {}
    if manifest.get("kind") == "mix" and manifest.get("parents"):
        heaviest = max(manifest["parents"], key=lambda parent: abs(parent["weight"]))["name"]
        if library.exists(heaviest):
            return library.get(heaviest)
    return entry


def training_conversations(entry: AdapterEntry) -> list[Messages]:
    """The conversations the adapter was trained on, as its manifest records them; [] when not known or gone (a
    file that is there but no longer reads raises, saying why)."""
    recorded = ((entry.manifest or {}).get("dataset") or {}).get("path")
    if not recorded or not Path(recorded).exists():
        return []
    return load_dataset_file(recorded).conversations


def held_out_prompts(entry: AdapterEntry, conversations: list[Messages]) -> tuple[list[EvalPrompt], str]:
    """The prompts the card asks, and where they came from: the held-out examples training recorded beside the
    adapter (never trained on), else the last ~10% of its training data (trained on, so the persona's loss there
    is optimistic: the card says which)."""
    recorded = read_heldout(entry.path)
    if recorded:
        prompts = [_split_last_reply(conversation) for conversation in recorded[:MAX_PROMPTS]]
        return prompts, f"{len(prompts)} of {len(recorded)} held-out examples (never trained on)"
    if not conversations:
        raise TailorError(f"'{entry.name}' has no recorded held-out examples and its training data is not available.",
                          "Give the questions to ask with --prompts FILE (a chat dataset, or one question per line).")
    count = min(MAX_PROMPTS, max(1, round(len(conversations) * HELD_OUT_FRACTION)))
    prompts = [_split_last_reply(conversation) for conversation in conversations[-count:]]
    return prompts, f"last {count} of {len(conversations)} training examples (trained on: no held-out split recorded)"


# Knowledge


@dataclass(frozen=True)
class KnowledgeQuestion:
    question: str
    accept: tuple[str, ...]
    """Any of these, as a whole word or phrase in the reply (any case), makes the answer right."""

    def answered_by(self, reply: str) -> bool:
        return any(re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", reply, re.IGNORECASE) for answer in self.accept)


def knowledge_questions(path: Path | None = None) -> list[KnowledgeQuestion]:
    path = path or resources_dir() / "eval" / "knowledge.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [KnowledgeQuestion(row["question"], tuple(row["accept"])) for row in rows]


# Loops


_WORDS = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    return [word.strip("'") for word in _WORDS.findall(text.lower()) if word.strip("'")]


def repeated_phrase(text: str, max_phrase_words: int = 12) -> str | None:
    """A phrase the text says three or more times back to back (a single word: four or more), or None."""
    tokens = words(text)
    for size in range(1, max_phrase_words + 1):
        needed = 4 if size == 1 else 3
        for start in range(len(tokens) - size * needed + 1):
            phrase = tokens[start:start + size]
            if all(tokens[start + size * k:start + size * (k + 1)] == phrase for k in range(1, needed)):
                return " ".join(phrase)
    return None


def repeated_ngram_fraction(text: str, n: int = 4) -> float:
    """The share of the text's word n-grams that it already said earlier: 0 for fresh text, near 1 for a loop."""
    tokens = words(text)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def loops(text: str) -> bool:
    """A reply loops when it says one phrase three times in a row ("Arr, matey! Arr, matey! Arr, matey!"), or when
    more than half of a longer reply's 4-word sequences repeat earlier ones (a loop with small variations)."""
    return repeated_phrase(text) is not None or (len(words(text)) >= 30 and repeated_ngram_fraction(text) > 0.5)


# On topic

RELEVANCE_TOKENS = 32
"""How much of a reply the topic judge reads: its opening, where a reply takes up its question or does not."""
_RELEVANCE_ROWS = 16
"""Questions scored in one forward pass: each holds RELEVANCE_TOKENS x vocabulary logits (~6 MB on SmolLM2), so a
prompts file of hundreds of questions is scored a slice at a time."""
RELEVANCE_QUESTIONS = 8
"""Questions the topic judge weighs each reply against at least: the card's own, topped up with knowledge questions
as distractors, so a reply passes by luck one time in eight at most. Not more: a distractor on the same subject as
one of the card's questions takes the credit from it (a six-prompt pirate card asked "What's the boiling point of
water?" beside twelve questions lost its right answer to "At what temperature in Celsius does water boil?")."""


class TopicJudge:
    """Does a reply answer its own question rather than another one?

    The base model (no adapter) reads the reply's first RELEVANCE_TOKENS tokens as the answer to each question on
    the card (its prompts, topped up with knowledge questions to RELEVANCE_QUESTIONS); the reply is on topic when
    its own question makes it more likely than every other question does. This ranks questions by how much they
    explain the reply (pointwise mutual information): the persona's manner of talking is about as likely after any question, so only
    what the reply says counts, and an answer in other words than the question's is credited ("Who painted the
    Mona Lisa?" -> "Leonardo da Vinci, partner, back in 1503"). A reply that could follow any question as well as
    its own (small talk, a loop) is not.
    """

    def __init__(self, session: ChatSession, questions: Sequence[Messages]):
        from app.core.templates import prompt_ids

        self._session = session
        self._prompts = [prompt_ids(session.tokenizer, list(messages)) for messages in questions]
        self._prefilled: list | None = None
        """The questions run through the base once, a slice at a time (cache, mask, next-token log-probabilities),
        for every reply."""

    def on_topic(self, question: int, reply: str) -> bool | None:
        """Whether `reply` is most likely after question number `question`; None with nothing to compare with."""
        if len(self._prompts) < 2:
            return None
        reply_ids = self._session.tokenizer(reply, add_special_tokens=False)["input_ids"][:RELEVANCE_TOKENS]
        if not reply_ids:
            return False
        scores = self.log_likelihoods(reply_ids)
        return all(scores[question] > score for index, score in enumerate(scores) if index != question)

    def log_likelihoods(self, reply_ids: list[int]) -> list[float]:
        """log p(reply | question) under the base, for every question."""
        import copy

        import torch

        session = self._session
        # generate() shares the model: hold the session's lock so no reply switches the adapter under this pass.
        with session._lock, torch.inference_mode():
            session.select(BASE)
            if self._prefilled is None:
                self._prefilled = [self._prefill(self._prompts[first:first + _RELEVANCE_ROWS])
                                   for first in range(0, len(self._prompts), _RELEVANCE_ROWS)]
            scores: list[float] = []
            length = len(reply_ids)
            for cache, mask, first in self._prefilled:
                rows = mask.shape[0]
                target = torch.tensor(reply_ids, device=session.device).expand(rows, -1)
                chunk = first.gather(1, target[:, :1])
                if length > 1:
                    logits = session.model(input_ids=target[:, :-1], cache=copy.deepcopy(cache), use_cache=True,
                                           attention_mask=torch.cat([mask, mask.new_ones(rows, length - 1)], dim=1),
                                           position_ids=mask.sum(1, keepdim=True) + torch.arange(length - 1, device=mask.device)).logits
                    chunk = chunk + torch.log_softmax(logits.float(), dim=-1).gather(-1, target[:, 1:, None]).sum(dim=1)
                scores += chunk[:, 0].tolist()
        return scores

    def _prefill(self, prompts: list[list[int]]):
        """The questions, left-padded into one batch, through the base: its cache, mask and the log-probabilities of
        each question's next token (the reply's first)."""
        import torch
        from transformers import DynamicCache

        session = self._session
        pad_id = _padding_id(session.tokenizer)
        width = max(map(len, prompts))
        device = session.device
        input_ids = torch.tensor([[pad_id] * (width - len(prompt)) + prompt for prompt in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in prompts], device=device)
        cache = DynamicCache(config=session.base_model.config)
        logits = session.model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                               cache=cache, use_cache=True, logits_to_keep=1).logits
        return cache, mask, torch.log_softmax(logits[:, -1].float(), dim=-1)


# Style


def _char_ngrams(text: str, sizes: Sequence[int] = (3, 4, 5)) -> Counter:
    """Character n-grams inside each word padded with spaces (like scikit-learn's char_wb): they catch spelling
    and dialect ("in' ", " ye ", "matey") whatever the topic's words are."""
    grams: Counter = Counter()
    for word in words(text):
        padded = f" {word} "
        for size in sizes:
            grams.update(padded[i:i + size] for i in range(max(1, len(padded) - size + 1)))
    return grams


def _normalised(vector: dict[str, float]) -> dict[str, float]:
    norm = math.sqrt(sum(value * value for value in vector.values()))
    return {key: value / norm for key, value in vector.items()} if norm else {}


def _cosine(a: dict[str, float], b: dict[str, float]) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(value * b.get(key, 0.0) for key, value in a.items())


_FUNCTION_WORDS = frozenset("""
a about above after again all am an and any are as at be been being but by can could did do does doing down for
from had has have having he her here hers him his how i if in into is it its just me more most my no nor not now of
off on once only or other our out over own same she should so some such than that the their them then there these
they this those through to too under until up very was we were what when where which while who whom why will with
would you your yours
""".split())
"""English's commonest words: how often a reply uses them says more about its length than about its voice."""


class SignatureWords:
    """The persona's signature words: words its training replies use far more often than the base model does.

    A word is one when it appears in at least one in ten training replies, and in a share of them at least five
    times its share of the base's replies (counted with half a reply added, so a word the base never said still has
    to be common in training). Function words are left out. The cowboy sample's are "partner", "reckon", "y'all"
    and "folks"; the pirate's "arr", "matey", "ye"; a persona whose style is a form rather than words (haiku) may
    have none.
    """

    MIN_SHARE = 0.2
    MIN_RATIO = 5.0

    def __init__(self, persona_texts: Sequence[str], base_texts: Sequence[str]):
        documents = [set(words(text)) - _FUNCTION_WORDS for text in persona_texts]
        counts = Counter(word for document in documents for word in document)
        self._persona_share = {word: count / len(documents) for word, count in counts.items()
                               if count / len(documents) >= self.MIN_SHARE}
        self._base_texts = list(base_texts)
        self._base_documents = [set(words(text)) for text in base_texts]
        self.words = self._signature(None)

    def _signature(self, leave_out: str | None) -> frozenset[str]:
        base = [document for document, text in zip(self._base_documents, self._base_texts) if text != leave_out]
        return frozenset(word for word, share in self._persona_share.items()
                         if share >= self.MIN_RATIO * (sum(word in document for document in base) + 0.5) / (len(base) + 1))

    def share(self, word: str) -> float:
        """The share of the training replies that use `word` (0 below MIN_SHARE)."""
        return self._persona_share.get(word, 0.0)

    def used(self, reply: str, leave_out: str | None = None) -> list[str]:
        """The signature words in `reply`, found with the base's reply `leave_out` not counted as the base's."""
        signature = self.words if leave_out is None else self._signature(leave_out)
        return sorted(signature & set(words(reply)))


class StyleJudge:
    """Does a reply read more like the persona's training replies than the base model's own replies do?

    Two tests, each calibrated on the base's replies (each judged with itself left out of the base's set), so a
    reply passes one only by beating nine in ten of the base's own replies at it:

    - signature words (see `SignatureWords`): the reply uses more of them than nine in ten base replies do, which
      for a voice the base does not have means at least one;
    - character n-grams, for a voice in spelling and form rather than words: every text becomes a TF-IDF vector of
      its character 3-5-grams (sublinear counts, so one looping phrase cannot dominate); a reply's margin is its
      similarity to the persona's training replies minus its similarity to the base's (mean cosine with each), and
      it passes when its margin is above nine in ten of the base's margins.

    A reply is in the persona's style when it passes either. The base's replies, judged the same way, score the
    floor to beat: a persona that talks like the base scores about as low, one that talks like its training data
    near all.
    """

    BASE_QUANTILE = 0.9

    def __init__(self, persona_texts: Sequence[str], base_texts: Sequence[str]):
        documents = [_char_ngrams(text) for text in [*persona_texts, *base_texts]]
        frequency: Counter = Counter(gram for document in documents for gram in document)
        self._idf = {gram: math.log((1 + len(documents)) / (1 + count)) + 1 for gram, count in frequency.items()}
        self._persona = self._mean([self.vector(text) for text in persona_texts])
        self._base_texts = list(base_texts)
        self._base_vectors = [self.vector(text) for text in base_texts]
        self.signature = SignatureWords(persona_texts, base_texts)
        base_margins = sorted(self.margin(text, leave_out=text) for text in base_texts)
        self.threshold = _quantile(base_margins, self.BASE_QUANTILE) if base_margins else 0.0
        base_signatures = sorted(len(self.signature.used(text, leave_out=text)) for text in base_texts)
        self.signature_threshold = _quantile(base_signatures, self.BASE_QUANTILE) if base_signatures else 0.0

    def vector(self, text: str) -> dict[str, float]:
        return _normalised({gram: (1 + math.log(count)) * self._idf.get(gram, 1.0)
                            for gram, count in _char_ngrams(text).items()})

    @staticmethod
    def _mean(vectors: list[dict[str, float]]) -> dict[str, float]:
        total: Counter = Counter()
        for vector in vectors:
            total.update(vector)
        return {key: value / max(1, len(vectors)) for key, value in total.items()}

    def margin(self, reply: str, leave_out: str | None = None) -> float:
        """Mean similarity to the persona's replies minus mean similarity to the base's (without `leave_out`)."""
        kept = [vector for vector, text in zip(self._base_vectors, self._base_texts) if text != leave_out]
        reply_vector = self.vector(reply)
        return _cosine(reply_vector, self._persona) - _cosine(reply_vector, self._mean(kept))

    def in_style(self, reply: str, leave_out: str | None = None) -> bool:
        """Whether `reply` passes either test, with the base's reply `leave_out` not counted as the base's."""
        if not reply.strip():
            return False
        return (len(self.signature.used(reply, leave_out)) > self.signature_threshold
                or self.margin(reply, leave_out) > self.threshold)


def _quantile(ordered: Sequence[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# The card


@dataclass(frozen=True)
class Tally:
    hits: int
    total: int

    def __str__(self) -> str:
        return f"{self.hits}/{self.total}"


@dataclass(frozen=True)
class ReplyPair:
    """One held-out prompt answered by the base and by the persona, each reply judged."""

    question: str
    reference: str | None
    base: str
    persona: str
    base_style: bool | None
    persona_style: bool | None
    base_loops: bool
    persona_loops: bool
    base_on_topic: bool | None
    persona_on_topic: bool | None


@dataclass(frozen=True)
class KnowledgeAnswer:
    question: str
    accept: list[str]
    base: str
    persona: str
    base_correct: bool
    persona_correct: bool


@dataclass(frozen=True)
class ReportCard:
    adapter: str
    base_model: str
    quant: str
    """The precision the base was held in, as chat says it ("4-bit (NF4)", "full precision (fp32)")."""
    settings: str
    """The generation settings every reply was made with, in words."""
    prompt_source: str
    system_prompt: str | None
    replies: list[ReplyPair]
    knowledge: list[KnowledgeAnswer]
    base_loss: float | None
    """Mean cross-entropy per reference-reply token under the base model; None without reference replies."""
    persona_loss: float | None
    loss_tokens: int
    created: str
    signature_words: list[str] = field(default_factory=list)
    """The persona's signature words (see `SignatureWords`), the commonest in training first."""
    version: int = CARD_VERSION

    @staticmethod
    def _tally(values) -> Tally | None:
        known = [value for value in values if value is not None]
        return Tally(sum(known), len(known)) if known else None

    def style(self, who: str = "persona") -> Tally | None:
        return self._tally(getattr(pair, f"{who}_style") for pair in self.replies)

    def loops(self, who: str = "persona") -> Tally:
        return Tally(sum(getattr(pair, f"{who}_loops") for pair in self.replies), len(self.replies))

    def on_topic(self, who: str = "persona") -> Tally | None:
        return self._tally(getattr(pair, f"{who}_on_topic") for pair in self.replies)

    def knowledge_score(self, who: str = "persona") -> Tally:
        return Tally(sum(getattr(answer, f"{who}_correct") for answer in self.knowledge), len(self.knowledge))

    @staticmethod
    def perplexity(loss: float | None) -> float | None:
        return math.exp(min(loss, 50.0)) if loss is not None else None

    def summary(self) -> str:
        """One line for the library: "style 9/10 · loops 0 · knowledge 7/8 (base 7/8)"."""
        style = self.style()
        parts = [f"style {style}" if style else "style n/a", f"loops {self.loops().hits}"]
        if self.knowledge:
            parts.append(f"knowledge {self.knowledge_score()} (base {self.knowledge_score('base')})")
        return " · ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ReportCard:
        return cls(**{**data, "replies": [ReplyPair(**pair) for pair in data["replies"]],
                      "knowledge": [KnowledgeAnswer(**answer) for answer in data["knowledge"]]})

    def to_text(self) -> str:
        """The card for a terminal: totals first, then every reply."""
        def loss_text(loss):
            return "n/a" if loss is None else f"{loss:.3f} (perplexity {self.perplexity(loss):.1f})"

        lines = [f"Report card for '{self.adapter}' on {self.base_model} ({self.quant})",
                 f"Prompts: {self.prompt_source}; {self.settings}.", "",
                 f"{'':<22}{'base':>12}{'persona':>12}",
                 f"{'style':<22}{_cell(self.style('base')):>12}{_cell(self.style()):>12}",
                 f"{'loops':<22}{_cell(self.loops('base')):>12}{_cell(self.loops()):>12}",
                 f"{'on topic':<22}{_cell(self.on_topic('base')):>12}{_cell(self.on_topic()):>12}",
                 f"{'knowledge':<22}{_cell(self.knowledge_score('base')):>12}{_cell(self.knowledge_score()):>12}",
                 f"Held-out loss ({self.loss_tokens} tokens): base {loss_text(self.base_loss)}, persona {loss_text(self.persona_loss)}",
                 f"Summary: {self.summary()}",
                 f"Signature words: {', '.join(self.signature_words) or 'none (the style is judged by its character patterns)'}"]
        for index, pair in enumerate(self.replies, 1):
            lines += ["", f"[{index}] {pair.question}",
                      f"  base    [{reply_marks(pair.base_style, pair.base_loops, pair.base_on_topic)}]: {pair.base}",
                      f"  persona [{reply_marks(pair.persona_style, pair.persona_loops, pair.persona_on_topic)}]: {pair.persona}"]
        lines += ["", "Knowledge (greedy answers: each model's most likely one):"]
        for answer in self.knowledge:
            lines.append(f"  {answer.question} (accepts {', '.join(answer.accept)}): base "
                         f"{'right' if answer.base_correct else 'wrong'}, persona {'right' if answer.persona_correct else 'wrong'}")
        return "\n".join(lines)


def _cell(tally: Tally | None) -> str:
    return str(tally) if tally else "n/a"


def reply_marks(style: bool | None, looping: bool, topical: bool | None) -> str:
    """What the judges said about one reply, in words: 'in style · loops · off topic', or 'plain'."""
    marks = [mark for mark, said in (("in style", style), ("loops", looping), ("off topic", topical is False)) if said]
    return " · ".join(marks) or "plain"


def card_settings(settings: GenerationSettings | None = None, max_new_tokens: int = REPLY_TOKENS) -> GenerationSettings:
    """The chat engine's defaults (or the given settings) with the card's seed and reply cap."""
    return replace(settings or GenerationSettings(), seed=EVAL_SEED, max_new_tokens=max_new_tokens)


def held_out_loss(session: ChatSession, choice: str, prompts: Sequence[EvalPrompt], system_prompt: str | None) -> tuple[float | None, int]:
    """Mean loss per token of the prompts' reference replies (assistant tokens only) under `choice`, and the count."""
    import torch

    from app.core.training import collate, trained_token_loss

    examples = [tokenize_conversation(session.tokenizer, with_system_prompt(
        [*prompt.messages, {"role": "assistant", "content": prompt.reference}], system_prompt), LOSS_MAX_LEN)[0]
        for prompt in prompts if prompt.reference]
    examples = [example for example in examples if example.trained_tokens]
    if not examples or session.peft_model is None:
        return None, 0
    total, tokens = 0.0, 0
    pad_id = _padding_id(session.tokenizer)
    # generate() shares the model: hold the session's lock so no reply switches the adapter under this pass.
    with session._lock, torch.inference_mode():
        session.select(choice)
        for example in examples:
            loss_sum, count = trained_token_loss(session.peft_model, collate([example], pad_id, False), session.device)
            total, tokens = total + float(loss_sum), tokens + count
    return total / tokens, tokens


CARD_BATCH = 24
"""Replies the card decodes together: all 44 of a default card (12 held-out prompts and 10 knowledge questions, base
and persona) fit in about two batches. On two CPU cores they took 82 s at 24, 90 s at 16, 113 s at 8 and 286 s one
at a time (SmolLM2 in fp32, same 44 replies each way)."""


def answer_together(session: ChatSession, asked: Sequence[tuple[Messages, str, GenerationSettings]],
                    stop: StopFlag | None = None, progress: Progress | None = None) -> list[str]:
    """Each (messages, persona or BASE, settings) answered, in order. The replies are decoded together, rows of
    different personas side by side, by the server's engine (app.core.serving): one forward pass per token for
    the whole batch instead of one per reply. Each row samples from its own generator seeded as `tailor chat`
    seeds it, so a reply is the one `tailor chat --seed` gives, whatever else is in the batch."""
    from app.core.serving import Delta, Failed, ServeRequest, ServingEngine

    report = progress or (lambda message: None)
    texts: list[list[str]] = [[] for _ in asked]
    failures: list[str] = []
    finished = threading.Semaphore(0)

    def listener(index: int):
        def hear(event) -> None:
            if isinstance(event, Delta):
                texts[index].append(event.text)
                return
            if isinstance(event, Failed):
                failures.append(event.message)
            finished.release()
        return hear

    engine = ServingEngine(session, None, max_batch=CARD_BATCH).start()
    try:
        for index, (messages, choice, settings) in enumerate(asked):
            engine.submit(ServeRequest(choice, list(messages), settings), listener(index))
        for done in range(1, len(asked) + 1):
            report(f"Replies: {done - 1} of {len(asked)} written…")
            while not finished.acquire(timeout=0.1):
                if stop is not None and stop.is_set():
                    raise EvaluationStopped("The evaluation was stopped before the card was complete.")
    finally:
        engine.close()
    if failures:
        raise TailorError(f"A reply for the card could not be generated: {failures[0]}")
    return ["".join(pieces).strip() for pieces in texts]


def build_report_card(session: ChatSession, persona: str, prompts: Sequence[EvalPrompt], style_references: Sequence[str],
                      knowledge: Sequence[KnowledgeQuestion] = (), prompt_source: str = "given prompts",
                      settings: GenerationSettings | None = None, progress: Progress | None = None,
                      stop: StopFlag | None = None) -> ReportCard:
    """Ask base and persona every prompt and knowledge question, measure the held-out loss, and judge the replies.

    `style_references` are the persona's training replies (the style to recognise); without them the style column
    reads n/a. `settings` default to the chat engine's defaults; the card fixes their seed either way. Setting
    `stop` ends the work within a token and raises EvaluationStopped.
    """
    if not prompts:
        raise TailorError("There are no prompts to evaluate.", "Give at least one question.")
    report = progress or (lambda message: None)
    system_prompt = session.system_prompt(persona)
    reply_settings = card_settings(settings)
    knowledge_settings = replace(card_settings(settings, KNOWLEDGE_TOKENS), temperature=KNOWLEDGE_TEMPERATURE)

    asked = [(with_system_prompt(prompt.messages, system_prompt), choice, reply_settings)
             for prompt in prompts for choice in (BASE, persona)]
    asked += [(with_system_prompt([{"role": "user", "content": question.question}], system_prompt), choice, knowledge_settings)
              for question in knowledge for choice in (BASE, persona)]
    replies = iter(answer_together(session, asked, stop, report))
    answers: dict[str, list[str]] = {BASE: [], persona: []}
    for _ in prompts:
        for choice in (BASE, persona):
            answers[choice].append(next(replies))
    known: dict[str, list[str]] = {BASE: [], persona: []}
    for _ in knowledge:
        for choice in (BASE, persona):
            known[choice].append(next(replies))
    report("Measuring the held-out loss…")
    base_loss, loss_tokens = held_out_loss(session, BASE, prompts, system_prompt)
    persona_loss, _ = held_out_loss(session, persona, prompts, system_prompt)

    # How the base talks: its replies to the held-out prompts and to the knowledge questions.
    judge = StyleJudge(style_references, [*answers[BASE], *known[BASE]]) if style_references else None
    report("Judging which replies take up their question…")
    asked = [prompt.messages for prompt in prompts]
    distractors = [[{"role": "user", "content": question.question}] for question in knowledge]
    topics = TopicJudge(session, [*asked, *[messages for messages in distractors if messages not in asked]][
        :max(len(asked), RELEVANCE_QUESTIONS)])
    pairs = []
    for index, (prompt, base_reply, persona_reply) in enumerate(zip(prompts, answers[BASE], answers[persona])):
        pairs.append(ReplyPair(
            question=prompt.question, reference=prompt.reference, base=base_reply, persona=persona_reply,
            base_style=judge.in_style(base_reply, leave_out=base_reply) if judge else None,
            persona_style=judge.in_style(persona_reply, leave_out=base_reply) if judge else None,
            base_loops=loops(base_reply), persona_loops=loops(persona_reply),
            base_on_topic=topics.on_topic(index, base_reply), persona_on_topic=topics.on_topic(index, persona_reply)))
    knowledge_answers = [KnowledgeAnswer(question.question, list(question.accept), base_reply, persona_reply,
                                         question.answered_by(base_reply), question.answered_by(persona_reply))
                         for question, base_reply, persona_reply in zip(knowledge, known[BASE], known[persona])]
    return ReportCard(
        adapter=persona, base_model=session.resolved.model_id, quant=session.precision.label, settings=reply_settings.describe(),
        prompt_source=prompt_source, system_prompt=system_prompt, replies=pairs, knowledge=knowledge_answers,
        base_loss=base_loss, persona_loss=persona_loss, loss_tokens=loss_tokens,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        signature_words=sorted(judge.signature.words, key=lambda word: (-judge.signature.share(word), word)) if judge else [])


@dataclass(frozen=True)
class CardPlan:
    """What a card will ask and compare with, worked out from files alone, so a bad prompts file or missing data
    is reported before a model is loaded."""

    prompts: list[EvalPrompt]
    source: str
    """Where the prompts come from, in words."""
    style_references: list[str]
    """The persona's training replies (without the prompts' own references): the style to recognise."""


def plan_card(library: Library, entry: AdapterEntry, prompts_file: str | Path | None = None) -> CardPlan:
    """The adapter's held-out prompts (or those in `prompts_file`) and its training replies; for a mix, those of
    its most heavily weighted parent."""
    trained_on = training_entry(library, entry)
    conversations = training_conversations(trained_on)
    if prompts_file:
        prompts, source = prompts_from_file(prompts_file), Path(prompts_file).name
    else:
        prompts, source = held_out_prompts(trained_on, conversations)
    asked = {prompt.reference for prompt in prompts}
    # The held-out replies themselves stay out of the style profile, or the persona would be judged against them.
    references = [message["content"] for conversation in conversations for message in conversation
                  if message["role"] == "assistant" and message["content"] not in asked]
    return CardPlan(prompts, source, references)


def evaluate_adapter(session: ChatSession, entry: AdapterEntry, plan: CardPlan, progress: Progress | None = None,
                     knowledge: Sequence[KnowledgeQuestion] | None = None, stop: StopFlag | None = None) -> ReportCard:
    """The card for a library adapter (opened in `session` here if it is not yet), as planned, with the shipped
    knowledge questions unless `knowledge` says otherwise."""
    persona = session.load_adapter(entry)
    # Measured as chat will talk: the persona's own recommended decoding where its manifest has one.
    settings = GenerationSettings().with_sampling(entry.sampling)
    return build_report_card(session, persona, plan.prompts, plan.style_references,
                             knowledge_questions() if knowledge is None else knowledge, plan.source, settings, progress, stop)


def save_report_card(library: Library, name: str, card: ReportCard) -> AdapterEntry:
    """Keep the card in the adapter's manifest, so the library can summarise it and bundles carry it."""
    return library.update_manifest(name, {CARD_KEY: card.to_dict()})


def saved_report_card(entry: AdapterEntry) -> ReportCard | None:
    """The card kept in the adapter's manifest, or None (never evaluated, or by an incompatible version)."""
    data = (entry.manifest or {}).get(CARD_KEY)
    if not isinstance(data, dict) or data.get("version") != CARD_VERSION:
        return None
    try:
        return ReportCard.from_dict(data)
    except (TypeError, KeyError):
        return None


def _padding_id(tokenizer) -> int:
    """What fills the short rows of a batch: the pad token, else end-of-sequence (a base without a pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
