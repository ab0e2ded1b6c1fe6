"""The serving engine's decode batch (app.core.running_batch, app.core.row_lora, app.core.skinny_linear) on real
models: rows that join at different times, with different personas, prompt lengths and sampling settings, each
produce exactly the reply `tailor chat` (ChatSession.reply) gives them alone."""

from __future__ import annotations

import pytest
import torch
from adapter_factory import make_random_adapters

from app.core import row_lora, skinny_linear
from app.core.chat import BASE, ChatSession, GenerationSettings
from app.core.library import Library
from app.core.running_batch import Row, RowSampler, RunningBatch
from app.core.serving import ServingEngine

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_session(tmp_path_factory, tiny_base):
    library = Library(tmp_path_factory.mktemp("batch-library"))
    make_random_adapters(library, tiny_base, ["wide"], rank=8, target_modules=LINEAR, seed=1)
    make_random_adapters(library, tiny_base, ["narrow"], rank=4, target_modules=("q_proj", "v_proj"), seed=2)
    make_random_adapters(library, tiny_base, ["dora"], rank=4, target_modules=LINEAR, seed=3, use_dora=True)
    session = ChatSession(str(tiny_base), "4bit")
    for name in ("wide", "narrow", "dora"):
        session.load_adapter(library.get(name))
    return session


def test_stacked_row_updates_equal_peft_s(tiny_session):
    """Rows of different personas (and ranks, and a base row) through one stacked update: each row gets the update
    peft computes for that persona alone (lora_B(lora_A(x)) * scaling) added to the base output, to the last bit
    or so (the tiny model's shapes let the BLAS block a batch differently; the slow test below checks whole replies
    bit for bit on SmolLM2's)."""
    session = tiny_session
    personas = ["wide", BASE, "narrow", "wide"]
    keys = [None if persona == BASE else session.adapter_key(persona) for persona in personas]
    stacked = row_lora.RowLora(session._lora_layers, keys)
    padded_rank = 0
    session.select(BASE)
    with torch.inference_mode():
        for layer in session._lora_layers:
            x = torch.randn(len(keys), 1, layer.in_features)
            base = layer(x)
            with stacked.applied():
                together = layer(x)
            for row, key in enumerate(keys):
                want = base[row]
                if key in layer.lora_A:
                    want = want + layer.lora_B[key](layer.lora_A[key](x[row:row + 1]))[0] * layer.scaling[key]
                torch.testing.assert_close(together[row], want, rtol=1e-6, atol=1e-6, msg=(layer, personas[row]))
                assert key not in layer.lora_A or not torch.equal(want, base[row]), "the persona changes the output"
            padded_rank += keys[2] in layer.lora_A
    assert padded_rank, "the narrow persona (rank 4 beside rank 8) adapts some layers, so zero padding was exercised"


def test_adapters_that_do_not_stack_are_left_to_peft(tiny_session):
    session = tiny_session
    wide, narrow, dora = (session.adapter_key(name) for name in ("wide", "narrow", "dora"))
    assert row_lora.supports(session.peft_model, session._lora_layers, {wide, narrow, None})
    assert not row_lora.supports(session.peft_model, session._lora_layers, {wide, dora})


def test_skinny_linears_give_each_plain_layer_s_product_and_leave_4bit_and_lora_layers_alone(tiny_session):
    """A CPU session multiplies a few rows through its plain linear layers as W·xᵀ: the same product as F.linear
    to the last bit or so, for every row; longer inputs go through F.linear itself. bitsandbytes' 4-bit layers and
    LoRA's A and B are not switched."""
    import torch.nn.functional as F
    from torch import nn

    from app.core.precision import cpu_vendor

    model = tiny_session.base_model
    switched = [name for name, module in model.named_modules() if "forward" in vars(module)]
    assert switched == (["lm_head"] if skinny_linear.pays_on(cpu_vendor()) else []), \
        "on an AMD CPU the session switched its only plain layer (the 4-bit base's LM head); elsewhere none"
    assert skinny_linear.install(model) == 1, "with LoRA layers loaded, only the LM head is switched, no LoRA matrix"
    biased = nn.Linear(24, 40)  # the base layers are bias-free; a bias must be added too
    assert skinny_linear.install(biased) == 1 and skinny_linear.install(nn.Linear(24, 40, dtype=torch.bfloat16)) == 0
    with torch.inference_mode():
        for layer in (model.lm_head, biased):
            assert vars(layer)["forward"].func is skinny_linear.skinny_forward
            for rows in (1, 2, 3, 4, 8, skinny_linear.SKINNY_ROWS + 1):
                x = torch.randn(rows, 1, layer.in_features)
                want = F.linear(x, layer.weight, layer.bias)
                got = layer(x)
                assert got.shape == want.shape and got.is_contiguous()
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                assert torch.equal(got, want) or rows <= skinny_linear.SKINNY_ROWS


def test_skinny_linears_are_used_on_the_cpus_they_were_measured_on():
    assert skinny_linear.pays_on("AuthenticAMD")
    assert not skinny_linear.pays_on("GenuineIntel") and not skinny_linear.pays_on(None)


def replies_alone_and_batched(session: ChatSession, jobs: list[tuple[str, str, GenerationSettings]],
                              joins: dict[int, list[int]]) -> tuple[list[str], list[str]]:
    """Each job's reply from `tailor chat`, and from one RunningBatch that job i joins before step joins[i]."""
    engine = ServingEngine(session, None)
    messages = [[{"role": "user", "content": prompt}] for _, prompt, _ in jobs]
    alone = [session.reply(message, persona, settings) for message, (persona, _, settings) in zip(messages, jobs)]
    batch = RunningBatch(session)
    rows = [Row(index, engine.prompt_ids(message), persona, RowSampler(settings, session.device))
            for index, (message, (persona, _, settings)) in enumerate(zip(messages, jobs))]
    replies: dict[int, list[int]] = {}
    step = 0
    while len(replies) < len(rows):
        for index in joins.get(step, []):
            batch.join(rows[index])
        ended = [row for row in batch.rows if row.tokens[-1] in engine._eos_ids
                 or len(row.tokens) - len(engine.prompt_ids(messages[row.owner])) >= jobs[row.owner][2].max_new_tokens]
        for row in ended:
            replies[row.owner] = row.tokens[len(engine.prompt_ids(messages[row.owner])):]
        batch.leave(ended)
        if batch:
            batch.step()
        step += 1
    decoded = [session.tokenizer.decode([token for token in replies[index] if token not in engine._eos_ids],
                                        skip_special_tokens=True).strip() for index in range(len(rows))]
    return alone, decoded


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["4bit", "none"])
def test_real_smollm2_rows_joining_at_different_times_answer_as_tailor_chat(tmp_path, smollm2_folder, quant):
    """On the 4-bit base and the unquantised one (whose decode steps multiply as W·xᵀ on an AMD CPU,
    app.core.skinny_linear)."""
    library = Library(tmp_path / "library")
    make_random_adapters(library, smollm2_folder, ["first", "second"], rank=16, target_modules=LINEAR)
    session = ChatSession(str(smollm2_folder), quant)
    for name in ("first", "second"):
        session.load_adapter(library.get(name))
    greedy = GenerationSettings(max_new_tokens=16, temperature=0)
    jobs = [("first", "What is the capital of France?", greedy),
            ("second", "Give me one tip for sleeping better, please.", greedy),
            (BASE, "Why?", greedy),
            ("second", "Write one sentence about the sea.", GenerationSettings(max_new_tokens=16, temperature=0.8, seed=7))]
    alone, batched = replies_alone_and_batched(session, jobs, {0: [0], 3: [1, 2], 6: [3]})
    assert all(len(reply) > 10 for reply in alone), alone
    assert batched == alone


def test_a_dora_persona_answers_beside_base_rows_without_a_library(tiny_session):
    """The report card runs the engine on a session with no library; a DoRA persona (which peft cannot run in a
    mixed batch) still decodes apart from the base's rows and gives chat's reply."""
    from app.core.chat import BASE, GenerationSettings
    from app.core.evaluation import answer_together

    greedy = GenerationSettings(temperature=0, max_new_tokens=12)
    asked = [([{"role": "user", "content": question}], choice, greedy)
             for question in ("What is rain?", "Name a planet.") for choice in (BASE, "dora")]
    assert answer_together(tiny_session, asked) == [tiny_session.reply(*request).rstrip("\ufffd") for request in asked]

