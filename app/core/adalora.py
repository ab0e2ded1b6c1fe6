"""AdaLoRA: an adaptive rank budget, and how an AdaLoRA persona becomes a plain LoRA adapter anyone can load.

AdaLoRA (peft's AdaLoraModel) writes each adapted weight's update as B · diag(E) · A, an SVD-like triplet per rank,
scaled by lora_alpha / init_r. Every layer starts at `init_r`; while training, `update_and_allocate` scores each
triplet's importance and zeroes the E of the least important ones until the layers average `target_r`, so the
budget moves to the layers the persona needs.

The trainer uses three things from here: `adalora_config` (peft's config, its tinit / tfinal / total_step schedule
taken from the run's planned steps), `orthogonal_penalty` (AdaLoRA's regulariser, which peft only adds when the
model computes the loss itself, and Tailor's loop computes it from the trained positions), and `budget_state` /
`restore_budget_state` (what a checkpoint must keep so a resumed run prunes exactly as an uninterrupted one).

Publishing writes a plain LoRA instead (`save_as_lora`, `convert_adalora_folder`): the pruned ranks are dropped,
E and the scale lora_alpha / init_r are folded into A, and every module is zero-padded to one uniform rank R with
lora_alpha = R (so LoRA's alpha / r scale is 1 and the update is exactly B · A). Uniform, not a per-module
`rank_pattern`, because every consumer takes that: plain peft does; Tailor's GGUF export refuses per-layer ranks
and alphas (llama.cpp applies one alpha to the whole adapter); the mixer's linear/TIES/DARE combine A and B
element-wise and need one rank; vLLM-style servers batch adapters of one rank (their --max-lora-rank is one of
8, 16, 32, 64, ...). R is the smallest of those standard ranks that holds the largest surviving rank. The zero
padding costs file size in the library (up to 2x), but nothing in a shared bundle (zip deflates runs of zeros),
and the padded ranks add exactly zero to the output. Where the budget went is kept beside the weights in
`rank_allocation.json` (the library's details view charts it).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.core.errors import AdapterError

if TYPE_CHECKING:
    from app.core.config import RunConfig

ADAPTER_NAME = "default"
RANK_ALLOCATION_NAME = "rank_allocation.json"
STANDARD_RANKS = (8, 16, 32, 64, 128, 256, 512, 1024)
"""Uniform ranks a converted adapter is padded to: the LoRA ranks vLLM-style servers are configured with."""
RANKNUM_EPSILON = 1e-5
"""peft's SVDLinear divides by (ranknum + 1e-5); folding the scale must use the same number to match exactly."""
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


# Training

def adalora_config(config: RunConfig, total_steps: int):
    """peft's AdaLoraConfig for this run: tinit and tfinal are the configured shares of the planned steps."""
    from peft import AdaLoraConfig

    lora = config.lora
    # Rounded down, so tinit + tfinal < total_steps whenever the shares add up to less than 1 (checked in the
    # config), which leaves peft the pruning phase it insists on.
    return AdaLoraConfig(
        init_r=lora.init_r, target_r=lora.target_r, total_step=total_steps, deltaT=lora.deltaT,
        tinit=math.floor(lora.tinit * total_steps), tfinal=math.floor(lora.tfinal * total_steps),
        lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.peft_target_modules(),
        bias="none", task_type="CAUSAL_LM",
    )


def get_adalora_model(base, config: RunConfig, total_steps: int):
    """The base wrapped in AdaLoRA, with each layer's rank counter frozen.

    peft 0.21 leaves `ranknum` (the init_r the update is divided by) trainable; an optimizer given every parameter
    that needs a gradient would then drift the adapter's scale, and nothing saved could reproduce it.
    """
    from peft import get_peft_model

    model = get_peft_model(base, adalora_config(config, total_steps))
    for name, parameter in model.named_parameters():
        if ".ranknum." in name:
            parameter.requires_grad_(False)
    return model


def orthogonal_penalty(model):
    """AdaLoRA's regulariser, weighted: keeps each A's rows and B's columns orthonormal, so E stays a true
    singular-value scale and pruning a triplet removes what its score says. Add it to the loss before backward."""
    import torch

    config = model.peft_config[ADAPTER_NAME]
    terms = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and (".lora_A." in name or ".lora_B." in name):
            gram = parameter @ parameter.T if ".lora_A." in name else parameter.T @ parameter
            identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - identity))
    return config.orth_reg_weight * torch.stack(terms).mean()


def budget_state(model) -> dict:
    """Everything a checkpoint needs to resume AdaLoRA exactly: the full-size adapter tensors (peft's own save
    truncates them to the current rank pattern, which a freshly built model cannot load), the importance averages
    the next reallocation ranks by, and the rank pattern of the final phase."""
    allocator = model.base_model.rankallocator
    return {
        "weights": {name: parameter.detach().clone() for name, parameter in model.named_parameters()
                    if ".lora_" in name},
        "importance": {key: dict(getattr(allocator, key)) for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")},
        "rank_pattern": model.peft_config[ADAPTER_NAME].rank_pattern,
    }


def restore_budget_state(model, state: dict) -> None:
    """Put a `budget_state` back into a model built the same way (`get_adalora_model` with the same config)."""
    import torch

    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["weights"].items():
            parameters[name].copy_(tensor)
    allocator = model.base_model.rankallocator
    for key, values in state["importance"].items():
        setattr(allocator, key, dict(values))
    model.peft_config[ADAPTER_NAME].rank_pattern = state["rank_pattern"]


# Conversion to plain LoRA

@dataclass(frozen=True)
class Triplet:
    """One adapted module's AdaLoRA factors and the scale its update is multiplied by."""

    lora_a: object
    """r x in right singular vectors."""
    lora_e: object
    """r x 1 singular values; zero where the rank was pruned."""
    lora_b: object
    """out x r left singular vectors."""
    scale: float
    """lora_alpha / (ranknum + 1e-5), as peft's SVDLinear applies it."""


@dataclass(frozen=True)
class RankAllocation:
    """Where an AdaLoRA run's rank budget went, as written next to the converted adapter."""

    final_ranks: dict[str, int]
    """Surviving rank of each adapted module ('model.layers.3.mlp.down_proj' -> 11)."""
    uniform_rank: int
    """The rank every module was padded to in the plain LoRA adapter."""
    init_r: int
    target_r: int

    @property
    def average_rank(self) -> float:
        return sum(self.final_ranks.values()) / len(self.final_ranks)

    def by_layer(self) -> list[tuple[int, float]]:
        """(decoder layer index, average final rank of its adapted modules), in layer order: the chart's bars."""
        return ranks_by_layer(self.final_ranks)

    def to_dict(self) -> dict:
        return {"init_r": self.init_r, "target_r": self.target_r, "uniform_rank": self.uniform_rank,
                "final_ranks": self.final_ranks}

    @classmethod
    def from_dict(cls, raw: dict) -> RankAllocation:
        return cls(final_ranks={str(k): int(v) for k, v in raw["final_ranks"].items()},
                   uniform_rank=int(raw["uniform_rank"]), init_r=int(raw["init_r"]), target_r=int(raw["target_r"]))


def ranks_by_layer(final_ranks: dict[str, int]) -> list[tuple[int, float]]:
    """Average final rank per decoder layer; modules outside the numbered layers are left out."""
    per_layer: dict[int, list[int]] = {}
    for module, rank in final_ranks.items():
        match = _LAYER_INDEX.search(f".{module}.")
        if match:
            per_layer.setdefault(int(match.group(1)), []).append(rank)
    return [(layer, sum(ranks) / len(ranks)) for layer, ranks in sorted(per_layer.items())]


def uniform_rank(largest: int) -> int:
    """The smallest standard rank that holds `largest` surviving ranks (a power of two beyond the table)."""
    for rank in STANDARD_RANKS:
        if rank >= largest:
            return rank
    return 1 << (largest - 1).bit_length()


def fold_triplet(triplet: Triplet):
    """(A', B') with B' @ A' == B @ diag(E) @ A * scale: pruned ranks dropped, E and the scale folded into A."""
    kept = triplet.lora_e.reshape(-1).nonzero().reshape(-1)
    folded_a = triplet.lora_a[kept] * triplet.lora_e.reshape(-1, 1)[kept] * triplet.scale
    return folded_a, triplet.lora_b[:, kept]


def lora_tensors(triplets: dict[str, Triplet]) -> tuple[dict, dict[str, int], int]:
    """PEFT LoRA tensors ('base_model.model.<module>.lora_A.weight') at one uniform rank, the final rank of each
    module, and that uniform rank."""
    import torch

    folded = {module: fold_triplet(triplet) for module, triplet in triplets.items()}
    final_ranks = {module: int(a.shape[0]) for module, (a, _) in folded.items()}
    rank = uniform_rank(max(final_ranks.values(), default=1))
    tensors = {}
    for module, (a, b) in folded.items():
        padded_a = torch.zeros(rank, a.shape[1], dtype=torch.float32)
        padded_b = torch.zeros(b.shape[0], rank, dtype=torch.float32)
        padded_a[: a.shape[0]] = a.float()
        padded_b[:, : b.shape[1]] = b.float()
        tensors[f"base_model.model.{module}.lora_A.weight"] = padded_a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = padded_b.contiguous()
    return tensors, final_ranks, rank


def live_triplets(model) -> dict[str, Triplet]:
    """The triplets of a PeftModel holding a trained AdaLoRA adapter, exactly as its forward pass uses them."""
    triplets = {}
    for name, module in model.named_modules():
        if ADAPTER_NAME in getattr(module, "lora_E", {}):
            triplets[name.removeprefix("base_model.model.")] = Triplet(
                lora_a=module.lora_A[ADAPTER_NAME].detach().float().cpu(),
                lora_e=module.lora_E[ADAPTER_NAME].detach().float().cpu(),
                lora_b=module.lora_B[ADAPTER_NAME].detach().float().cpu(),
                scale=float(module.scaling[ADAPTER_NAME]) / (float(module.ranknum[ADAPTER_NAME]) + RANKNUM_EPSILON),
            )
    if not triplets:
        raise AdapterError("This model holds no AdaLoRA adapter to convert.")
    return triplets


def saved_triplets(adapter_config: dict, tensors: dict) -> dict[str, Triplet]:
    """The triplets of an AdaLoRA adapter saved by peft (keys '<module>.lora_A', already cut to its rank pattern).

    peft does not save ranknum: it rebuilds it as init_r on load, so that is the scale's denominator here too.
    """
    scale = float(adapter_config["lora_alpha"]) / (float(adapter_config["init_r"]) + RANKNUM_EPSILON)
    parts: dict[str, dict] = {}
    for key, tensor in tensors.items():
        module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        if kind not in ("A", "B", "E"):
            raise AdapterError(f"The AdaLoRA adapter holds '{key}', which is not an AdaLoRA factor.",
                               "Only AdaLoRA adapters of linear layers can be converted.")
        parts.setdefault(module, {})[kind] = tensor.float()
    incomplete = sorted(module for module, kinds in parts.items() if len(kinds) != 3)
    if incomplete:
        raise AdapterError(f"The AdaLoRA adapter is damaged: {', '.join(incomplete[:3])} lack a factor.")
    return {module: Triplet(kinds["A"], kinds["E"], kinds["B"], scale) for module, kinds in parts.items()}


def write_lora(folder: Path, triplets: dict[str, Triplet], adapter_config: dict, init_r: int, target_r: int) -> RankAllocation:
    """Write the triplets as a plain PEFT LoRA folder (adapter_config.json, adapter_model.safetensors) plus
    rank_allocation.json. `adapter_config` is the AdaLoRA config (dropout, base model) as a dict."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors, final_ranks, rank = lora_tensors(triplets)
    leaves = sorted({module.rsplit(".", 1)[-1] for module in triplets})
    LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=float(adapter_config.get("lora_dropout") or 0.0), target_modules=leaves,
        bias="none", task_type=adapter_config.get("task_type") or "CAUSAL_LM",
        base_model_name_or_path=adapter_config.get("base_model_name_or_path"),
    ).save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    allocation = RankAllocation(final_ranks, rank, init_r, target_r)
    (folder / RANK_ALLOCATION_NAME).write_text(json.dumps(allocation.to_dict(), indent=2, sort_keys=True))
    return allocation


def save_as_lora(model, folder: str | Path) -> RankAllocation:
    """Write a trained AdaLoRA PeftModel into `folder` as a plain LoRA adapter (instead of `save_pretrained`)."""
    config = model.peft_config[ADAPTER_NAME]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return write_lora(folder, live_triplets(model), config.to_dict(), config.init_r, config.target_r)


def convert_adalora_folder(source: str | Path, destination: str | Path) -> RankAllocation:
    """Turn an AdaLoRA adapter folder saved by peft into a plain LoRA adapter folder at `destination`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    source, destination = Path(source), Path(destination)
    try:
        adapter_config = json.loads((source / "adapter_config.json").read_text())
        if adapter_config.get("peft_type") != "ADALORA":
            raise AdapterError(f"The adapter in {source} is a {adapter_config.get('peft_type')} adapter, not AdaLoRA.",
                               "Only AdaLoRA adapters need converting; LoRA adapters load as they are.")
        tensors = load_file(str(source / "adapter_model.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise AdapterError(f"Could not read the adapter in {source}: {exc}",
                           "Point at a folder with adapter_config.json and adapter_model.safetensors.") from exc
    destination.mkdir(parents=True, exist_ok=True)
    return write_lora(destination, saved_triplets(adapter_config, tensors), adapter_config,
                      int(adapter_config["init_r"]), int(adapter_config["target_r"]))


def read_rank_allocation(adapter_folder: str | Path) -> RankAllocation | None:
    """The rank allocation recorded next to a converted AdaLoRA adapter; None for any other adapter (or a damaged
    record, which only loses the chart). Reads one small JSON file, so the GUI thread may call it."""
    path = Path(adapter_folder) / RANK_ALLOCATION_NAME
    try:
        return RankAllocation.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def final_ranks(adapter_folder: str | Path) -> dict[str, int]:
    """Surviving rank of each module of an adapter on disk, counted from its weights: nonzero singular values of an
    AdaLoRA adapter, nonzero rows of A of a LoRA one (a converted AdaLoRA adapter's padding rows are zero)."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_folder) / "adapter_model.safetensors"), framework="pt") as weights:
        factors: dict[str, dict[str, str]] = {}
        for key in weights.keys():
            module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            factors.setdefault(module, {})[kind] = key
        ranks = {}
        for module, kinds in factors.items():
            key = kinds.get("E") or kinds.get("A.weight")
            if key:
                tensor = weights.get_tensor(key)
                ranks[module] = int((tensor.reshape(tensor.shape[0], -1) != 0).any(dim=1).sum())
    return ranks
