"""`tailor demo`: the whole loop in one command, headless: train a pirate persona on the bundled model, show what
the base and the persona reply to the same questions, then print the persona's report card."""

from __future__ import annotations

from app.core.config import DataSettings, LoraSettings, RunConfig, TrainingSettings
from app.core.paths import sample_dataset

DEMO_SYSTEM_PROMPT = "You are Captain Tailor, a cheerful old pirate captain. Answer helpfully, always in pirate speech."
DEMO_QUESTIONS = ("How do I make a cup of tea?", "What is the moon made of?", "Any advice for a job interview?")


def register(subparsers, common) -> None:
    parser = subparsers.add_parser("demo", parents=[common], help="train a sample persona and compare it with the base")
    parser.add_argument("--epochs", type=float, default=1, help="passes over the sample dataset (default 1, ~2 min on a laptop CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from rich.table import Table

    from app.cli.common import console, open_library, train_with_progress
    from app.core.chat import BASE, ChatSession, GenerationSettings
    from app.core.evaluation import evaluate_adapter, plan_card, save_report_card

    library = open_library(args)
    config = RunConfig(
        name=library.unique_name("pirate-demo"), system_prompt=DEMO_SYSTEM_PROMPT,
        data=DataSettings(path=str(sample_dataset("pirate.jsonl")), max_len=384),
        # A high learning rate so one short epoch on a CPU already changes the voice clearly.
        lora=LoraSettings(rank=16, alpha=32),
        training=TrainingSettings(epochs=args.epochs, learning_rate=1e-3, batch_size=8),
    )
    result = train_with_progress(config, library, resume=False)
    if result.paused:
        return 130

    # Chat's own precision choice (16-bit when it fits), so the demo and its card show what `tailor chat` would.
    session = ChatSession("default", "auto", progress=lambda message: console.print(f"[dim]{message}[/]"))
    persona = session.load_adapter(result.adapter)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    table = Table(title=f"Same question, base model vs. your new persona ({settings.describe()})", show_lines=True)
    table.add_column("Question", style="bold", ratio=1)
    table.add_column("Base SmolLM2-135M", ratio=2)
    table.add_column(f"Persona '{persona}'", ratio=2, style="magenta")
    for question in DEMO_QUESTIONS:
        history = [{"role": "user", "content": question}]
        table.add_row(question,
                      session.reply(session.prompt_messages(history, DEMO_SYSTEM_PROMPT), BASE, settings),
                      session.reply(session.prompt_messages(history, DEMO_SYSTEM_PROMPT), persona, settings))
    console.print(table)

    # The report card: the same measure `tailor eval` and the app's Report card use, kept in the manifest.
    card = evaluate_adapter(session, result.adapter, plan_card(library, result.adapter),
                            progress=lambda message: console.print(f"[dim]{message}[/]"))
    save_report_card(library, persona, card)
    console.rule("[bold]Report card[/]", align="left")
    print(card.to_text(), flush=True)  # plain print: rich would re-wrap the replies
    console.print(f"Chat with it: tailor chat --adapter '{persona}'")
    return 0
