"""Report cards for rendering tests: a small hand-made one, and the real pirate card the slow test records."""

from __future__ import annotations

import json
from pathlib import Path

from app.core.evaluation import KnowledgeAnswer, ReplyPair, ReportCard

RECORDED_PIRATE_CARD = Path(__file__).resolve().parents[1] / "docs" / "report-card-pirate.json"
"""Written by tests/core/test_evaluation.py::test_real_pirate_persona_beats_the_base_on_style (real SmolLM2)."""


def sample_card(adapter: str = "pirate") -> ReportCard:
    """Three prompts (one persona reply loops), two knowledge questions: enough to exercise every mark."""
    def pair(question, base, persona, persona_style, persona_loops=False):
        return ReplyPair(question, None, base, persona, False, persona_style, False, persona_loops, True, True)

    return ReportCard(
        adapter=adapter, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", quant="none",
        settings="temperature 0.7, top-p 0.9, seed 0, up to 160 new tokens", prompt_source="questions.txt",
        system_prompt="You are a pirate.",
        replies=[pair("Why is the sky blue?", "Light scatters in the air.", "Arr, sunlight scatters, matey!", True),
                 pair("How do tides work?", "The Moon pulls the oceans.", "Arr matey! Arr matey! Arr matey!", True, True),
                 pair("What is rain?", "Water falling from clouds.", "Water falling from clouds.", False)],
        knowledge=[KnowledgeAnswer("What is the capital of Japan?", ["Tokyo"], "Tokyo.", "Tokyo, matey.", True, True),
                   KnowledgeAnswer("How many days are there in a week?", ["seven", "7"], "Seven.", "Arr!", True, False)],
        base_loss=2.5, persona_loss=1.9, loss_tokens=120, created="2026-11-29T09:00:00+0000",
        signature_words=["matey", "arr"])


def recorded_or_sample_card() -> ReportCard:
    if RECORDED_PIRATE_CARD.is_file():
        return ReportCard.from_dict(json.loads(RECORDED_PIRATE_CARD.read_text()))
    return sample_card()
