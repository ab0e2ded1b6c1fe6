"""Persona mixes: several LoRA adapters combined into one with peft's `add_weighted_adapter`.

A mix is built inside a chat session (on the base that is already loaded) so it can be tried before it is kept;
saving writes the mixed adapter as a plain PEFT folder, loadable with `PeftModel.from_pretrained` anywhere, plus a
manifest (kind "mix") naming its parents and weights.

Whether adapters *can* be mixed is decided here from their configs alone, without torch, so the mixer can explain a
refusal while the user moves the sliders rather than after a failed load.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from app import __version__
from app.core.errors import AdapterError, TailorError
from app.core.library import LIBRARY_VERSION, MANIFEST_NAME, AdapterEntry, Library, write_json_atomic

if TYPE_CHECKING:
    from app.core.chat import ChatSession

METHODS = ("linear", "cat", "svd", "ties", "dare_ties", "dare_linear")
METHOD_HELP = {
    "linear": "weighted sum of the low-rank matrices; fast, needs equal ranks, a rough approximation",
    "cat": "stacks the adapters side by side: exact, any ranks, rank of the mix = sum of ranks",
    "svd": "exact weighted sum of the updates, compressed back to the largest rank; any ranks, slower",
    "ties": "keeps each adapter's strongest changes and resolves sign conflicts; equal ranks",
    "dare_ties": "randomly drops changes, rescales the rest, then TIES; equal ranks",
    "dare_linear": "randomly drops changes, rescales the rest, then sums; equal ranks",
}
# peft combines A and B matrices element-wise for these, which only lines up when every parent has the same rank.
EQUAL_RANK_METHODS = ("linear", "ties", "dare_ties", "dare_linear")
DENSITY_METHODS = ("ties", "dare_ties", "dare_linear")


@dataclass(frozen=True)
class MixSpec:
    parents: tuple[tuple[str, float], ...]
    """(adapter name, weight) pairs; a negative weight subtracts a persona's traits."""
    method: str = "linear"
    """How peft combines the adapters: one of METHODS."""
    density: float = 0.5
    """Share of each adapter's changes that TIES/DARE keep (ignored by linear, cat and svd)."""
    seed: int = 0
    """DARE drops changes at random; a fixed seed makes the preview and the saved mix the same adapter."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "parents", tuple((str(name), float(weight)) for name, weight in self.parents))
        if self.method not in METHODS:
            raise TailorError(f"Unknown mix method '{self.method}'.", f"Use one of: {', '.join(METHODS)}.")
        if not self.parents:
            raise TailorError("A mix needs at least one adapter.", "Pick adapters and give each a weight, e.g. A:0.7 B:0.3.")
        duplicates = sorted({name for name in self.names if self.names.count(name) > 1})
        if duplicates:
            raise TailorError(f"'{duplicates[0]}' appears twice in the mix.", "Give each adapter once, with its total weight.")
        if any(not math.isfinite(weight) for weight in self.weights) or not any(self.weights):
            raise TailorError("Mix weights must be finite numbers and not all zero.")
        if not 0 < self.density <= 1:
            raise TailorError(f"Density must be in (0, 1], not {self.density}.")

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.parents]

    @property
    def weights(self) -> list[float]:
        return [weight for _, weight in self.parents]

    @property
    def heaviest_parent(self) -> str:
        """The parent whose voice (system prompt) the mix keeps: the largest weight, the first on a tie."""
        return max(self.parents, key=lambda parent: abs(parent[1]))[0]

    def describe(self) -> str:
        terms = " + ".join(f"{name} x{weight:g}" for name, weight in self.parents)
        density = f", density {self.density:g}" if self.method in DENSITY_METHODS else ""
        return f"{self.method}: {terms}{density}"

    def to_manifest(self) -> dict:
        return {"method": self.method, "parents": [{"name": name, "weight": weight} for name, weight in self.parents],
                "density": self.density if self.method in DENSITY_METHODS else None, "seed": self.seed}


def parse_terms(terms: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """'A:0.7' -> ('A', 0.7); a bare name means weight 1. Adapter names cannot contain ':', so the last one splits."""
    parsed = []
    for term in terms:
        name, separator, weight_text = term.rpartition(":")
        if not separator:
            name, weight_text = term, "1"
        try:
            weight = float(weight_text)
        except ValueError:
            raise TailorError(f"'{term}' is not NAME:WEIGHT.", "Write each adapter as its name, a colon and a number, e.g. pirate:0.7") from None
        if not name.strip():
            raise TailorError(f"'{term}' has no adapter name before the colon.")
        parsed.append((name.strip(), weight))
    return tuple(parsed)


def mix_problem(spec: MixSpec, parents: Sequence[AdapterEntry]) -> str | None:
    """Why these adapters cannot be mixed this way, in words the user can act on; None when they can."""
    for entry in parents:
        if entry.problem:
            return f"'{entry.name}' is damaged: {entry.problem}"
        config = entry.adapter_config()
        if config.get("use_dora"):
            return f"'{entry.name}' is a DoRA adapter; peft mixes only plain LoRA matrices, not DoRA's magnitudes"
        if config.get("use_rslora"):
            return f"'{entry.name}' uses rsLoRA scaling, which peft's mixing does not preserve"
        if config.get("target_parameters") or config.get("modules_to_save"):
            return f"'{entry.name}' trains whole layers or parameters besides its LoRA matrices, which cannot be mixed"
    fingerprints = {entry.base_fingerprint for entry in parents if entry.base_fingerprint}
    if len(fingerprints) > 1:
        bases = sorted({f"{entry.name} ({entry.base_model_id})" for entry in parents if entry.base_fingerprint})
        return f"the adapters were trained on different base models: {', '.join(bases)}"
    if len({isinstance(entry.adapter_config().get("target_modules"), str) for entry in parents}) > 1:
        return "some adapters name their target layers by a pattern and others by a list; peft cannot combine those"
    ranks = {entry.name: _max_rank(entry) for entry in parents}
    if spec.method in EQUAL_RANK_METHODS and len(parents) > 1 and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{name} has rank {rank}" for name, rank in ranks.items())
        return f"{spec.method} needs adapters of equal rank ({listed}); use cat or svd, which accept different ranks"
    return None


def _max_rank(entry: AdapterEntry) -> int:
    config = entry.adapter_config()
    return max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])


def combine(peft_model, parent_keys: list[str], spec: MixSpec, new_key: str) -> None:
    """Add the mix to a PeftModel that holds its parents (under `parent_keys`) as a new adapter `new_key`."""
    import torch

    # DARE's random drops come from torch's global generator; a fixed seed makes the mix repeatable.
    torch.manual_seed(spec.seed)
    try:
        peft_model.add_weighted_adapter(
            parent_keys, spec.weights, new_key, combination_type=spec.method,
            density=spec.density if spec.method in DENSITY_METHODS else None,
        )
    except (ValueError, TypeError, RuntimeError) as exc:
        raise AdapterError(f"peft could not mix {', '.join(spec.names)} with {spec.method}: {str(exc).splitlines()[0]}") from exc


def save_mix(session: ChatSession, library: Library, name: str) -> AdapterEntry:
    """Write the session's mix `name` into the library as a plain PEFT folder with a 'mix' manifest."""
    spec = session.mixes.get(name)
    if spec is None:
        raise AdapterError(f"There is no mix named '{name}' in this chat session.", "Preview the mix first.")
    if library.exists(name):
        raise AdapterError(f"An adapter named '{name}' already exists.", "Pick another name for the mix.")
    with library.staging() as scratch:
        folder = session.export_adapter(name, scratch)
        config_path = folder / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = session.resolved.model_id
        write_json_atomic(config_path, adapter_config)
        manifest = {
            "library_version": LIBRARY_VERSION,
            "tailor_version": __version__,
            "name": name,
            "kind": "mix",
            "system_prompt": session.system_prompt(spec.heaviest_parent),
            "base_model": session.base_description(),
            "quant": session.quant,
            **spec.to_manifest(),
            "rank": adapter_config.get("r"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(folder / MANIFEST_NAME, manifest)
        entry = library.publish(folder, name)
    session.mark_saved(name, entry)
    return entry

