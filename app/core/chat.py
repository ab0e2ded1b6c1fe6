"""One base model loaded once, many persona adapters on top of it, chosen per message.

Every adapter is loaded into the same PeftModel under its own name; switching persona is `set_adapter`, which
only flips which low-rank matrices the forward pass uses, so no base weights are reloaded. "base" runs with all
adapters disabled.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

from app.core.errors import AdapterError
from app.core.library import AdapterEntry
from app.core.models import Progress, ResolvedBase, load_model, load_tokenizer, pick_device, resolve_base

BASE = "base"


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    """Upper bound on the reply length in tokens."""
    temperature: float = 0.0
    """0 means greedy (the same reply every time); higher values give more varied replies."""
    top_p: float = 0.9
    """Sample only from the most likely tokens whose probabilities add up to this (ignored when greedy)."""
    seed: int | None = None
    """Fixes sampling, so compare mode gives every column the same random draws."""


class ChatSession:
    def __init__(self, base: str = "default", quant: str = "4bit", device: str | None = None,
                 progress: Progress | None = None, trust_remote_code: bool = False):
        self.resolved: ResolvedBase = resolve_base(base, progress)
        self.device = device or pick_device()
        self.tokenizer = load_tokenizer(self.resolved.folder, trust_remote_code)
        if progress:
            progress(f"Loading {self.resolved.model_id} ({quant}) on {self.device.upper()}…")
        self.base_model = load_model(self.resolved.folder, quant, self.device, trust_remote_code)
        self.base_model.config.use_cache = True
        self.base_model.eval()
        self._peft_model = None
        self.adapters: dict[str, AdapterEntry] = {}
        # generate() is not re-entrant on one model: two personas answering at once would race on set_adapter.
        self._lock = threading.Lock()

    @property
    def model(self):
        return self._peft_model if self._peft_model is not None else self.base_model

    def incompatibility(self, entry: AdapterEntry) -> str | None:
        """Why this adapter cannot be used on the loaded base, or None if it can."""
        if entry.problem:
            return f"damaged: {entry.problem}"
        expected = (entry.manifest or {}).get("base_model", {})
        if expected.get("fingerprint") and expected["fingerprint"] != self.resolved.fingerprint():
            return f"trained for {expected.get('id', 'another base model')}, not {self.resolved.model_id}"
        modules = {name.rsplit(".", 1)[-1] for name, _ in self.base_model.named_modules()}
        targets = entry.adapter_config().get("target_modules") or []
        if isinstance(targets, list):
            missing = sorted(set(targets) - modules)
            if missing:
                return f"targets layers this base does not have ({', '.join(missing)})"
        return None

    def load_adapter(self, entry: AdapterEntry) -> str:
        """Load (once) and return the adapter's name; refuses an adapter that does not fit, with the reason."""
        if entry.name in self.adapters:
            return entry.name
        reason = self.incompatibility(entry)
        if reason:
            raise AdapterError(f"Cannot use '{entry.name}' with this base model: {reason}.")
        from peft import PeftModel

        try:
            if self._peft_model is None:
                self._peft_model = PeftModel.from_pretrained(self.base_model, str(entry.path), adapter_name=entry.name)
            else:
                self._peft_model.load_adapter(str(entry.path), adapter_name=entry.name)
        except (RuntimeError, ValueError, OSError) as exc:
            # Tensor shape mismatches surface here when an adapter without a manifest comes from another base.
            raise AdapterError(f"Cannot use '{entry.name}' with {self.resolved.model_id}: {str(exc).splitlines()[0]}") from exc
        self._peft_model.eval()
        self.adapters[entry.name] = entry
        return entry.name

    def prompt_messages(self, history: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
        return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + history

    def stream(self, messages: list[dict[str, str]], adapter: str = BASE, settings: GenerationSettings = GenerationSettings(),
               stop: threading.Event | None = None) -> Iterator[str]:
        """Yield the reply piece by piece as it is generated; setting `stop` ends it early."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        class _StopFlag(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return bool(stop is not None and stop.is_set())

        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True).to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = settings.temperature > 0
        options = dict(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=sampling, streamer=streamer,
                       stopping_criteria=StoppingCriteriaList([_StopFlag()]), pad_token_id=self.tokenizer.pad_token_id)
        if sampling:
            options.update(temperature=settings.temperature, top_p=settings.top_p)
        else:
            options.update(temperature=None, top_p=None, top_k=None)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if settings.seed is not None:
                        torch.manual_seed(settings.seed)
                    self._select(adapter)
                    if adapter == BASE and self._peft_model is not None:
                        with self._peft_model.disable_adapter():
                            self._peft_model.generate(**options)
                    else:
                        self.model.generate(**options)
            except BaseException as exc:  # re-raised in the consumer's thread below
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, name="tailor-generate", daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if failure:
            raise failure[0]

    def reply(self, messages: list[dict[str, str]], adapter: str = BASE, settings: GenerationSettings = GenerationSettings()) -> str:
        return "".join(self.stream(messages, adapter, settings)).strip()

    def _select(self, adapter: str) -> None:
        if adapter == BASE:
            return
        if adapter not in self.adapters:
            raise AdapterError(f"The adapter '{adapter}' is not loaded in this chat.")
        self._peft_model.set_adapter(adapter)

