"""The Compare tab's engine: each pane of a side-by-side batch equals its model answering alone; seeds, errors,
blind votes, prompt sets, and the tab's handlers, on a tiny model with fake finished runs."""
from __future__ import annotations

import csv
import io
import json
import random
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from app.chat import panes as chat
from app.chat.cache import Loaded, ModelCache, StackedLora, can_pack_weights, pack_linear_weights
from app.chat.generate import Sampling, chat_turns, generate, stop_token_ids
from app.chat import prompt_sets
from app.chat import prompting
from app.chat import votes
from app.runs.store import FAILED, RUNNING, RunStore
from app.spec import RunConfig
from app.data.template import chat_prompt
from app.workspace import Workspace
from conftest import build_tiny_model
from lora_runs import perturbed_lora, save_full_run, save_lora_run

PROMPTS = ["Hi", "What is the capital of France?", "Write a long poem about the sea.", "2+2?", "Tell me a joke",
           "List three colours"]
RUNS = ["lora-r4", "lora-r8-qv", "full"]
GREEDY = Sampling(max_new_tokens=12, temperature=0)




pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, embedded_model_dir) -> Path:
    """The tiny model with an end-of-turn embedding that some adapters reach early and others never: so rows of
    one batch finish at different steps (the batch shrinks) while others run to the token limit."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-eos"), embedded_model_dir)
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(3)
    with torch.no_grad():
        model.model.embed_tokens.weight[2] = torch.randn(model.config.hidden_size) * 0.25
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory, base_dir) -> Workspace:
    workspace = Workspace.open(tmp_path_factory.mktemp("compare") / "workspace")
    store = RunStore(workspace.runs)
    ref = str(base_dir)
    save_lora_run(store, base_dir, ref, "lora-r4", r=4, seed=1)
    save_lora_run(store, base_dir, ref, "lora-r8-qv", r=8, seed=2, targets="q_proj,v_proj")
    save_full_run(store, base_dir, ref, "full", seed=3, scale=0.1)
    save_lora_run(store, base_dir, ref, "dora", r=4, seed=6, scale=0.5, use_dora=True)
    save_lora_run(store, base_dir, ref, "crashed", r=4, seed=4, state=FAILED)
    store.update_status("crashed", reason="out of memory at step 12")
    store.create(RunConfig(model=ref, method="lora", run_id="training"))
    store.update_status("training", state=RUNNING)
    # Trained on another model: run.yaml says so (other-model), or run.yaml was edited and only the shapes tell.
    other = build_tiny_model(tmp_path_factory.mktemp("tiny-narrow"), base_dir, hidden_size=32, intermediate_size=64)
    save_lora_run(store, other, str(other), "other-model", r=4, seed=5)
    save_lora_run(store, other, ref, "wrong-shapes", r=4, seed=5)
    return workspace


def answers_alone(folder: Path, prompts: list[str], adapter: Path | None = None, full: Path | None = None) -> list[str]:
    """Greedy answers of one model on its own, one prompt at a time, through transformers' generate: the reference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(full or folder).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    answers = []
    for prompt in prompts:
        ids = tokenizer(chat_prompt(tokenizer, [(prompt, None)]), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                                 eos_token_id=sorted(stop_token_ids(tokenizer)), pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


@pytest.fixture(scope="module")
def reference(ws, base_dir) -> dict[str, list[str]]:
    """Every model's greedy answer to every prompt, each computed alone."""
    final = RunStore(ws.runs).final_dir
    return {
        chat.BASE: answers_alone(base_dir, PROMPTS),
        "lora-r4": answers_alone(base_dir, PROMPTS, adapter=final("lora-r4")),
        "lora-r8-qv": answers_alone(base_dir, PROMPTS, adapter=final("lora-r8-qv")),
        "full": answers_alone(base_dir, PROMPTS, full=final("full")),
    }


@pytest.fixture(scope="module")
def loaded(ws, base_dir) -> Loaded:
    return ModelCache().load(ws, str(base_dir), chat.resolve_panes(ws, str(base_dir), RUNS))


def last(iterator):
    result = None
    for result in iterator:
        pass
    return result


# --- the side-by-side batch equals each model alone ----------------------------------------------------------
@pytest.mark.parametrize("fast_lora", [True, False], ids=["one-shot-lora", "peft-mixed-batch"])
def test_every_pane_equals_its_model_alone(ws, base_dir, reference, fast_lora):
    """All prompts on all panes in one call (several batches, rows of different lengths, rows that end early)."""
    loaded = ModelCache(fast_lora=fast_lora).load(ws, str(base_dir), chat.resolve_panes(ws, str(base_dir), RUNS))
    assert [p.kind for p in loaded.panes] == ["base", "lora", "lora", "separate"]
    table = last(prompt_sets.run_prompt_set(loaded, PROMPTS, GREEDY))
    for j, pane in enumerate(loaded.panes):
        assert [row[j + 1] for row in table.rows] == reference[pane.key], pane.key
    # The check can fail: every model answers each prompt differently from every other model, ...
    for i in range(len(PROMPTS)):
        answers = [reference[k][i] for k in reference]
        assert len(set(answers)) == len(answers), PROMPTS[i]
    # ... and some rows stopped early while others ran to the limit, so the shrinking batch was exercised.
    lengths = {len(a) for k in ("lora-r4", chat.BASE) for a in reference[k]}
    assert min(lengths) < max(lengths)


def test_a_dora_adapter_gets_its_own_model_and_answers_like_it(ws, base_dir, reference):
    """peft refuses DoRA in mixed batches: it runs beside the shared batch, on a base of its own."""
    panes = chat.resolve_panes(ws, str(base_dir), ["dora", "lora-r4"])
    assert [p.kind for p in panes] == ["base", "separate", "lora"]
    loaded = ModelCache().load(ws, str(base_dir), panes)
    rows = [(p.key, chat_prompt(loaded.tokenizer, [(PROMPTS[3], None)])) for p in panes]
    texts = [o.text for o in last(generate(loaded, rows, GREEDY))]
    dora = answers_alone(base_dir, PROMPTS[3:4], adapter=RunStore(ws.runs).final_dir("dora"))[0]
    assert texts == [reference[chat.BASE][3], dora, reference["lora-r4"][3]]
    assert dora != reference[chat.BASE][3]


def test_streams_every_pane_token_by_token(loaded):
    rows = [(p.key, chat_prompt(loaded.tokenizer, [(PROMPTS[2], None)])) for p in loaded.panes]
    steps = list(generate(loaded, rows, GREEDY))
    assert len(steps) >= max(o.tokens for o in steps[-1]) > 1  # one update per token, not one at the end
    # After the first step every pane has its first token and a timing; counts grow by at most one per step.
    assert all(o.first_token_s is not None for o in steps[0])
    for before, after in zip(steps, steps[1:]):
        assert all(b.tokens <= a.tokens <= b.tokens + 1 for b, a in zip(before, after))
    assert all(o.done for o in steps[-1])
    assert all(o.tokens_per_s > 0 for o in steps[-1] if o.tokens)


def test_stacked_lora_equals_peft_mixed_batch(ws, base_dir):
    """The one-shot LoRA layers give peft's logits for a batch mixing the base and adapters of different rank and
    targets; removing them gives peft's own forward back."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = RunStore(ws.runs).final_dir
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final("lora-r4"), adapter_name="a")
    model.load_adapter(str(final("lora-r8-qv")), adapter_name="b")
    model.eval()
    names = ["a", chat.BASE, "b", "a"]
    ids = torch.randint(3, 1000, (4, 7))
    with torch.inference_mode():
        expected = model(input_ids=ids, adapter_names=names).logits
        stacked = StackedLora(model)
        stacked.select(names)
        got = model.base_model.model(input_ids=ids).logits
        stacked.remove()
        again = model(input_ids=ids, adapter_names=names).logits
        with model.disable_adapter():
            base_only = model(input_ids=ids[:1]).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(again, expected, atol=1e-5)
    assert not torch.allclose(base_only, expected[:1], atol=1e-3)  # adapter "a" really changes row 0


def test_packed_weights_give_the_same_logits_and_still_take_adapters(base_dir, ws):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not can_pack_weights():
        pytest.skip("this torch build has no oneDNN weight packing; the plain weights are used")
    ids = torch.randint(3, 1000, (3, 9))
    plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    packed = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    linears = sum(type(m) is torch.nn.Linear for m in packed.modules())
    assert pack_linear_weights(packed) == linears == 2 * 7 + 1
    with torch.inference_mode():
        assert torch.allclose(packed(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-4)
        adapter = RunStore(ws.runs).final_dir("lora-r4")
        on_packed = PeftModel.from_pretrained(packed, adapter).eval()
        on_plain = PeftModel.from_pretrained(plain, adapter).eval()
        assert torch.allclose(on_packed(input_ids=ids).logits, on_plain(input_ids=ids).logits, atol=1e-4)
    assert packed.model.embed_tokens.weight.numel() > 0  # the tied input embeddings keep their weights


@pytest.mark.parametrize("settings", [
    dict(temperature=0.9, top_p=0.9, repetition_penalty=1.3, seed=7),
    dict(temperature=1.5, top_p=1.0, repetition_penalty=1.0, seed=123),
])
def test_seeded_sampling_repeats_and_matches_each_pane_alone(loaded, settings):
    sampling = Sampling(max_new_tokens=6, **settings)
    rows = [(p.key, chat_prompt(loaded.tokenizer, [(PROMPTS[1], None)])) for p in loaded.panes]
    first = [o.text for o in last(generate(loaded, rows, sampling))]
    assert [o.text for o in last(generate(loaded, rows, sampling))] == first
    for row, text in zip(rows, first):
        assert last(generate(loaded, [row], sampling))[0].text == text, row[0]
    other_seed = Sampling(max_new_tokens=6, **{**settings, "seed": settings["seed"] + 1})
    assert [o.text for o in last(generate(loaded, rows, other_seed))] != first


def test_each_pane_keeps_its_own_history(loaded):
    """Multi-turn: a pane's prompt is built from its own past turns, so panes with different pasts answer differently."""
    histories = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
    ]
    texts = [chat_prompt(loaded.tokenizer, chat_turns(h) + [("And now?", None)]) for h in histories]
    assert "Hello!" in texts[0] and "Go away." in texts[1]
    outs = last(generate(loaded, [("lora-r8-qv", t) for t in texts], GREEDY))
    assert outs[0].text != outs[1].text


@pytest.mark.parametrize("history, turns", [
    ([], []),
    (None, []),
    ([{"role": "user", "content": "a"}], [("a", None)]),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     [("a", "b"), ("c", None)]),
    ([{"role": "assistant", "content": "orphan"}, "junk", {"role": "user", "content": [{"type": "text", "text": "x"}]}],
     [("x", None)]),
])
def test_chat_turns(history, turns):
    assert chat_turns(history) == turns


@pytest.mark.parametrize("method, args, label", [
    ("lora", {}, "LoRA r=8 alpha=16 targets=attention"),
    ("lora", {"r": 16, "alpha": 32, "targets": "all-linear", "dora": True}, "LoRA r=16 alpha=32 targets=all-linear dora=True"),
    ("full", {}, "Full fine-tune"),
    ("no-such-method", {"r": 4}, "no-such-method r=4"),
    ("lora", {"rank": 4}, "lora rank=4"),  # settings this version does not know: shown as written
])
def test_pane_labels_name_the_method_and_what_shapes_it(method, args, label):
    assert chat.settings_label(method, args) == label


# --- plain-language errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("keys, words", [
    ([], "Choose at least one trained run"),
    ([""], "Choose at least one trained run"),
    (["crashed"], "failed: out of memory at step 12"),
    (["other-model"], "was trained on"),
    (["training"], "still training"),
    (["no-such-run"], "not in this workspace"),
    (["../etc"], "not in this workspace"),
    (["lora-r4/step-9"], "no finished checkpoint step-9"),
])
def test_runs_that_cannot_be_compared_say_why(ws, base_dir, keys, words):
    with pytest.raises(chat.ChatError, match=words):
        chat.resolve_panes(ws, str(base_dir), keys)


def test_adapter_of_another_shape_is_refused_in_plain_words(ws, base_dir):
    panes = chat.resolve_panes(ws, str(base_dir), ["wrong-shapes"])  # run.yaml names this base: only shapes tell
    cache = ModelCache()
    with pytest.raises(chat.ChatError, match="does not fit this base model.*trained for (32|64)"):
        cache.load(ws, str(base_dir), panes)
    # The refusal left the cache working for runs that do fit.
    assert cache.load(ws, str(base_dir), chat.resolve_panes(ws, str(base_dir), ["lora-r4"])).routes


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
])
def test_model_too_large_for_memory_is_a_plain_error(ws, base_dir, monkeypatch, error):
    cache = ModelCache()

    def too_big(folder):
        raise error

    monkeypatch.setattr(cache, "_load_base", too_big)
    with pytest.raises(chat.ChatError, match="do not fit in this machine's memory"):
        cache.load(ws, str(base_dir), chat.resolve_panes(ws, str(base_dir), ["lora-r4"]))


def test_other_failures_are_not_disguised_as_memory(ws, base_dir, monkeypatch):
    cache = ModelCache()
    monkeypatch.setattr(cache, "_load_base", lambda folder: (_ for _ in ()).throw(RuntimeError("shape bug")))
    with pytest.raises(RuntimeError, match="shape bug"):
        cache.load(ws, str(base_dir), chat.resolve_panes(ws, str(base_dir), ["lora-r4"]))


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("max_new_tokens", 10_000), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5),
    ("repetition_penalty", 0),
])
def test_bad_sampling_settings_name_the_field(field, value):
    with pytest.raises(chat.ChatError, match=field):
        Sampling(**{field: value})


def test_chat_longer_than_the_model_reads_says_clear(loaded):
    rows = [(chat.BASE, "word " * 2100)]
    with pytest.raises(chat.ChatError, match="press Clear"):
        next(generate(loaded, rows, GREEDY))


def test_run_choices_list_finished_runs_and_checkpoints(ws, base_dir, tmp_path):
    store = RunStore(ws.runs)
    checkpoint = store.checkpoints_dir("training") / "step-2"
    (checkpoint / "adapter").mkdir(parents=True)
    for f in store.final_dir("lora-r4").iterdir():
        (checkpoint / "adapter" / f.name).write_bytes(f.read_bytes())
    (store.checkpoints_dir("training") / "step-4").mkdir()  # cut short: no COMPLETE marker
    (checkpoint / "COMPLETE").touch()
    keys = [k for _, k in chat.run_choices(store)]
    assert {"lora-r4", "lora-r8-qv", "full", "training/step-2"} <= set(keys)
    assert "crashed" not in keys and "training" not in keys and "training/step-4" not in keys
    panes = chat.resolve_panes(ws, str(base_dir), ["training/step-2"])
    assert panes[1].kind == "lora" and panes[1].weights == checkpoint / "adapter"


def test_a_checkpoint_of_a_running_run_answers_like_its_weights(ws, base_dir, reference):
    """The trainer's own checkpoint format (trainable weights, no adapter config) opens as a pane."""
    import torch
    from transformers import AutoModelForCausalLM

    from app import methods
    from app.training.checkpoints import Checkpointer
    from app.training.worker import trainable_weights

    store = RunStore(ws.runs)
    args = {"r": 4, "targets": "all-linear"}
    store.create(RunConfig(model=str(base_dir), method="lora", method_args=args, run_id="live"))
    store.update_status("live", state=RUNNING)
    model = methods.prepare_model(AutoModelForCausalLM.from_pretrained(base_dir), "lora",
                                  store.config("live").method_settings)
    torch.manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.25)
    Checkpointer(store.checkpoints_dir("live"), keep_last=2).save(3, trainable_weights(model), {})
    assert "live/step-3" in [key for _, key in chat.run_choices(store)]
    loaded = ModelCache().load(ws, str(base_dir), chat.resolve_panes(ws, str(base_dir), ["live/step-3"]))
    tokenizer = loaded.tokenizer
    prompt = chat_prompt(tokenizer, [(PROMPTS[1], None)])
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.eval().generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=sorted(stop_token_ids(tokenizer)))
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert last(generate(loaded, [("live/step-3", prompt)], GREEDY))[0].text == expected
    assert expected != reference[chat.BASE][1]


# --- blind votes ----------------------------------------------------------------------------------------------
def test_votes_persist_across_a_reload_and_tally_per_run(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    book = votes.VoteBook(ws)
    shown = [chat.BASE, "run-a", "run-b"]
    for winner in ["run-a", "run-a", "run-b", votes.TIE]:
        book.add(votes.Vote(winner=winner, shown=shown, labels={"run-a": "LoRA r=8"}))
    tally = {row.key: row for row in votes.VoteBook(Workspace.open(tmp_path / "ws")).tally()}
    assert (tally["run-a"].wins, tally["run-a"].shown, tally["run-a"].ties) == (2, 4, 1)
    assert (tally["run-b"].wins, tally[chat.BASE].wins) == (1, 0)
    assert tally["run-a"].label == "LoRA r=8" and tally["run-a"].win_share == 0.5


@pytest.mark.parametrize("garbage", [
    "{not json", "[1, 2, 3]", '{"votes": "many"}', "\udcff".encode("utf-8", "surrogatepass").decode("latin-1"),
])
def test_a_garbled_votes_file_is_set_aside_not_fatal(tmp_path, garbage):
    ws = Workspace.open(tmp_path / "ws")
    (ws.root / votes.VOTES_FILE).write_text(garbage, encoding="utf-8")
    book = votes.VoteBook(ws)
    assert book.tally() == []
    book.add(votes.Vote(winner="x", shown=["x", "y"]))
    assert [r.key for r in book.tally()] == ["x", "y"]
    assert list(ws.root.glob(f"{votes.VOTES_FILE}.unreadable-*"))


def test_bad_entries_are_skipped_and_bad_votes_refused(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    entries = [{"winner": "x", "shown": ["x"]}, {"winner": 3, "shown": ["x"]}, {"shown": ["x"]}, "nope",
               {"winner": "x", "shown": "x"}, {"winner": "y", "shown": ["x", "y"], "time": "noon", "labels": []}]
    (ws.root / votes.VOTES_FILE).write_text(json.dumps({"votes": entries}), encoding="utf-8")
    assert len(votes.VoteBook(ws).load()) == 2
    with pytest.raises(ValueError, match="not one of the panes"):
        votes.VoteBook(ws).add(votes.Vote(winner="z", shown=["x", "y"]))


def test_votes_from_many_browsers_at_once_are_all_kept(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    threads = [threading.Thread(target=votes.VoteBook(ws).add, args=(votes.Vote(winner="a", shown=["a", "b"]),))
               for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert votes.VoteBook(ws).tally()[0].wins == 16


PANES = [chat.Pane(chat.BASE, "Base model", "base"), chat.Pane("run-a", "LoRA r=8", "lora"),
         chat.Pane("run-b/step-4", "LoRA r=16", "lora")]


@pytest.mark.parametrize("blind, seed", [(False, 0), (True, 0), (True, 1), (True, 2)])
def test_a_blind_session_shuffles_the_panes_and_hides_their_names(blind, seed):
    session = votes.CompareSession.start(PANES, "embedded", ["run-a", "run-b/step-4"], blind, random.Random(seed))
    order = list(range(len(PANES)))
    if blind:
        random.Random(seed).shuffle(order)
    assert session.keys == tuple(PANES[i].key for i in order)
    assert session.labels == tuple(PANES[i].label for i in order)  # each label stays with its pane
    assert session.revealed is not blind and session.runs == ("run-a", "run-b/step-4")
    assert session.same_choice("embedded", ["run-a", "run-b/step-4"], blind)
    assert not session.same_choice("embedded", ["run-a"], blind)
    assert not session.same_choice("other", ["run-a", "run-b/step-4"], blind)
    assert not session.same_choice("embedded", ["run-a", "run-b/step-4"], not blind)


@pytest.mark.parametrize("index, winner", [(0, 0), (2, 2), (-1, None)])
def test_a_session_vote_names_the_pane_shown_there_and_reveals(index, winner):
    session = replace(votes.CompareSession.start(PANES, "embedded", ["run-a"], True, random.Random(3)), prompt="Hi")
    vote = session.vote_for(index)
    assert vote.winner == (votes.TIE if winner is None else session.keys[winner])
    assert vote.shown == list(session.keys) and vote.prompt == "Hi" and vote.base == "embedded"
    assert vote.labels == {p.key: p.label for p in PANES}
    after = session.voted()
    assert after.revealed and after.voted_prompt == "Hi" and after.keys == session.keys


@pytest.mark.parametrize("keys, finals", [
    (["run-a", "run-b/step-4", "run-b"], ["run-a", "run-b"]),
    (["run-b/step-4", "run-b/step-2"], []),
    ([], []),
    (["run-c/"], ["run-c/"]),  # nothing after the slash: no checkpoint named, so the run itself
])
def test_final_choices_leave_out_checkpoints(keys, finals):
    choices = [(f"label of {key}", key) for key in keys]
    assert chat.final_choices(choices) == [(f"label of {key}", key) for key in finals]


# --- prompt sets ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, prompts", [
    ("one\ntwo\n\n  three  \n", ["one", "two", "three"]),
    ("same\nsame\nother", ["same", "other"]),
])
def test_typed_prompts(text, prompts):
    assert prompt_sets.typed_prompts(text) == prompts


@pytest.mark.parametrize("text", ["", "   \n \n", None])
def test_an_empty_typed_list_is_refused(text):
    with pytest.raises(prompt_sets.PromptSetError, match="at least one prompt"):
        prompt_sets.typed_prompts(text)


def test_validation_prompts_are_the_rows_the_run_held_out(tmp_path, base_dir):
    from app.data.dataset import split_rows

    ws = Workspace.open(tmp_path / "ws")
    rows = [{"instruction": f"Question {i}?", "input": "ctx" if i % 3 == 0 else "", "output": f"Answer {i}."}
            for i in range(20)]
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    store = RunStore(ws.runs)
    store.create(RunConfig(model=str(base_dir), dataset=str(data_file), val_split=0.2, seed=5, run_id="r"))
    store.create(RunConfig(model=str(base_dir), dataset=str(data_file), val_split=0, run_id="no-val"))
    store.create(RunConfig(model=str(base_dir), dataset=str(tmp_path / "gone.jsonl"), run_id="gone"))
    _, held = split_rows(rows, 0.2, 5)
    expected = [r["instruction"] + ("\n\nctx" if r["input"] else "") for r in held]
    assert prompt_sets.validation_prompts(ws, "r") == expected and len(expected) == 4
    for run_id, words in [("no-val", "no validation rows"), ("gone", "cannot be read"), ("", "Choose a run")]:
        with pytest.raises(prompt_sets.PromptSetError, match=words):
            prompt_sets.validation_prompts(ws, run_id)


def test_demo_sets_are_the_cards_held_out_prompts():
    from app.data.dataset import demo_datasets

    sets = prompt_sets.demo_sets()
    assert sets == {card.title: list(card.held_out_prompts) for card in demo_datasets()}


def test_table_exports_round_trip(tmp_path):
    table = prompt_sets.PromptTable(["Prompt", "Base", "LoRA r=8"], [["a | b", "line1\nline2", 'say "hi", ok']])
    csv_path, md_path = prompt_sets.save_table(table, Workspace.open(tmp_path / "ws"))
    assert list(csv.reader(io.StringIO(csv_path.read_text(encoding="utf-8")))) == [table.headers, table.rows[0]]
    md = md_path.read_text(encoding="utf-8").splitlines()
    assert md[0] == "| Prompt | Base | LoRA r=8 |" and md[2] == '| a \\| b | line1<br>line2 | say "hi", ok |'


# --- the tab's handlers ---------------------------------------------------------------------------------------
def test_send_streams_into_every_pane_then_blind_vote_reveals(ws, base_dir, reference):
    from components import compare_tab as tab

    cache = ModelCache()
    keys = ["lora-r4", "full"]
    session, status, *_ = tab.prepare(ws, str(base_dir), keys, True)
    assert sorted(session.keys) == sorted([chat.BASE, *keys]) and not session.revealed
    empty = [[] for _ in range(tab.MAX_PANES)]
    steps = list(tab.send(ws, cache, str(base_dir), keys, True, session, PROMPTS[0], "", 12, 0, 1, 1, 0, *empty))
    assert len(steps) > 3  # loading, then one update per token
    session, status, box, *updates = steps[-1]
    columns, chats = updates[:tab.MAX_PANES], updates[tab.MAX_PANES:2 * tab.MAX_PANES]
    assert status.startswith("Done") and box == ""
    for i, key in enumerate(session.keys):
        assert chats[i]["label"] == f"Model {tab.LETTERS[i]}"
        assert chats[i]["value"][-1]["content"] == reference[key][0]
    assert [u["visible"] for u in columns] == [i <= len(keys) for i in range(tab.MAX_PANES)]
    histories = [u["value"] for u in chats]
    session, status, tally, *updates = tab.vote(ws, 1, session, *histories)
    assert session.revealed and updates[tab.MAX_PANES + 1]["label"].startswith("B: ")
    assert votes.VoteBook(ws).tally()[0].key == session.keys[1]
    kept = votes.VoteBook(ws).load()[-1]  # what each pane answered, for a preference dataset
    assert kept.answers == {key: reference[key][0] for key in session.keys}
    assert kept.conversations == {key: [{"role": "user", "content": PROMPTS[0]}] for key in session.keys}
    again = tab.vote(ws, 0, session, *histories)
    assert "Already voted" in again[1] and len(votes.VoteBook(ws).load()) == 1


def test_the_tab_builds(ws):
    import gradio as gr

    from components import compare_tab
    from components.shared import Shared

    with gr.Blocks() as demo:
        shared = Shared(
            workspace=ws, model=gr.Dropdown(choices=["embedded"], value="embedded", allow_custom_value=True),
            cutoff_len=gr.Slider(render=False), batch_size=gr.Slider(render=False), dataset=gr.State(""),
            val_dataset=gr.State(None), val_split=gr.Slider(render=False), grad_accum=gr.Slider(render=False),
            method_choice=gr.State(None), system_prompt=gr.Textbox(render=False),
        )
        with gr.Tabs(), gr.Tab("Compare") as tab:
            compare_tab.build(shared, tab)
    runs = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "compare-runs")
    assert ("lora-r4" in [key for _, key in runs.choices]) and "crashed" not in [key for _, key in runs.choices]


def test_send_reports_a_failed_run_without_raising(ws, base_dir):
    from components import compare_tab as tab

    empty = [[] for _ in range(tab.MAX_PANES)]
    steps = list(tab.send(ws, ModelCache(), str(base_dir), ["crashed"], False, None, "Hi", "", 12, 0, 1, 1, 0, *empty))
    assert len(steps) == 1 and "failed" in steps[0][1] and steps[0][2] == "Hi"



# --- each pane speaks the setting its run was trained with: system prompt and tools -----------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                          "parameters": {"type": "object", "properties": {}}}}
PIRATE = "Talk like a pirate."
# A ChatML template that writes the tools offered (as SmolLM2's does not): so the test can see them reach the prompt.
TOOL_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% else %}{% set system = '' %}"
    "{% endif %}{% if system or tools %}<|im_start|>system\n{{ system }}{% if tools %}\n# Tools\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}{% endif %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}{% if message['role'] != 'system' %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_row(system: str = "", tools: list | None = None, question: str = "Weather in Paris?") -> dict:
    """A stored conversation row: two user turns, the first answered through a tool call."""
    row: dict = {"system": system} if system else {}
    row["messages"] = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                                              "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "get_weather", "content": "sunny"},
        {"role": "assistant", "content": "Sunny, matey."},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "assistant", "content": "Rain."},
    ]
    if tools:
        row["tools"] = tools
    return row


ALPACA = [{"instruction": "Say hi", "input": "", "output": "Hi"}, {"instruction": "Add", "input": "2+2", "output": "4"}]


@pytest.mark.parametrize("config_system, rows, system, tools, notes", [
    ("", ALPACA, "", (), []),
    ("Be brief.", ALPACA, "Be brief.", (), []),
    ("", [chat_row(PIRATE, [WEATHER]), chat_row(PIRATE, [WEATHER])], PIRATE, (WEATHER,), []),
    # The rows' own system prompt is what training used, whatever the run's dataset-level one says.
    ("Be brief.", [chat_row(PIRATE), chat_row(PIRATE)], PIRATE, (), []),
    # Rows without one were trained with the run's: the same text, so nothing differs.
    (PIRATE, [chat_row(PIRATE), chat_row()], PIRATE, (), []),
    ("", [chat_row(PIRATE), chat_row()], "", (), ["different system prompts, so this pane gets none"]),
    ("Be brief.", [chat_row("A."), chat_row("B.")], "Be brief.", (), ["different system prompts, so this pane gets the run's"]),
    # A conversation that needs no tool leaves them out: it does not count against the shared list.
    ("", [chat_row(tools=[WEATHER, CLOCK]), chat_row()], "", (WEATHER, CLOCK), []),
    ("", [chat_row(tools=[WEATHER]), chat_row(tools=[CLOCK])], "", (), ["different tool lists, so no tools"]),
    ("", [chat_row(tools=[WEATHER, CLOCK]), chat_row(tools=[CLOCK, WEATHER])], "", (), ["different tool lists"]),
    ("", [], "", (), []),
])
def test_a_run_pane_gets_the_system_prompt_and_tools_it_was_trained_with(config_system, rows, system, tools, notes):
    told = prompting.run_prompting(config_system, prompting.data_prompting(rows))
    assert (told.system, told.tools) == (system, tools)
    assert len(told.notes()) == len(notes) and all(w in n for w, n in zip(notes, told.notes()))


@pytest.mark.parametrize("runs, typed, systems, note", [
    ([PIRATE], "", [PIRATE, PIRATE], ""),  # one run with a system prompt: the base model gets it too
    ([""], "", ["", ""], ""),  # a run without one: nobody gets one
    ([PIRATE, PIRATE], "", [PIRATE, PIRATE, PIRATE], ""),
    ([PIRATE, "Be brief."], "", ["", PIRATE, "Be brief."], "The base model: the runs were trained with different "
                                                           "system prompts, so it gets none."),
    ([PIRATE, ""], "", ["", PIRATE, ""], "different system prompts"),
    # A typed system prompt goes to every pane, and the runs' disagreement no longer matters.
    ([PIRATE, "Be brief."], "  Answer in French. ", ["Answer in French."] * 3, ""),
    ([""], "Answer in French.", ["Answer in French."] * 2, ""),
])
def test_which_system_prompt_each_pane_gets(runs, typed, systems, note):
    trained = [prompting.Prompting(s) for s in runs]
    panes = [chat.Pane(chat.BASE, "Base", "base", prompting=prompting.base_prompting(trained))]
    panes += [chat.Pane(f"run-{i}", f"Run {i}", "lora", prompting=p) for i, p in enumerate(trained)]
    session = replace(votes.CompareSession.start(panes, "embedded", [p.key for p in panes[1:]], False), system=typed)
    told = session.told()
    assert [t.system for t in told] == systems
    assert all(t.typed == bool(typed.strip()) for t in told)
    said = chat.prompting_notes(session.keys, told)
    assert (note in said) if note else said == ""


@pytest.mark.parametrize("runs, tools, note", [
    ([(WEATHER,), (WEATHER,)], (WEATHER,), ""),
    ([(WEATHER,), ()], (), "trained with different tools"),
    ([(WEATHER,), (CLOCK,)], (), "trained with different tools"),
])
def test_the_base_model_gets_the_tools_the_runs_share(runs, tools, note):
    base = prompting.base_prompting([prompting.Prompting("", t) for t in runs])
    assert base.tools == tools and (note in base.tools_note if note else not base.tools_note)


@pytest.mark.parametrize("told, line", [
    (prompting.Prompting(), "No system prompt"),
    (prompting.Prompting(PIRATE, (WEATHER, CLOCK)), f"System prompt (trained with): “{PIRATE}” · tools: get_weather, get_time"),
    (prompting.Prompting("Answer\nin French.", typed=True), "System prompt (yours): “Answer in French.”"),
    (prompting.Prompting("x" * 200), f"System prompt (trained with): “{'x' * 79}…”"),
])
def test_the_line_under_a_pane_says_what_it_is_told(told, line):
    assert told.describe() == line


@pytest.mark.parametrize("systems, blind, revealed, hidden", [
    ([PIRATE, "Be brief."], True, False, True),  # different settings would tell the blind panes apart
    ([PIRATE, PIRATE], True, False, False),
    ([PIRATE, "Be brief."], True, True, False),
    ([PIRATE, "Be brief."], False, True, False),
])
def test_blind_panes_hide_settings_that_would_tell_them_apart(systems, blind, revealed, hidden):
    from components import compare_tab as tab

    panes = [chat.Pane(f"run-{i}", f"Run {i}", "lora", prompting=prompting.Prompting(s)) for i, s in enumerate(systems)]
    session = replace(votes.CompareSession.start(panes, "embedded", [p.key for p in panes], blind), revealed=revealed)
    lines = tab.told_lines(session)
    assert (lines == [tab.HIDDEN_TOLD] * 2) if hidden else sorted(lines) == sorted(p.prompting.describe() for p in panes)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_the_tools_lookup_reads_a_file_once_per_version(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(PIRATE, [WEATHER])] * 3)
    first = prompting.dataset_prompting(str(path))
    assert first.tools == (WEATHER,) and first.systems == (PIRATE,)
    assert prompting.dataset_prompting(str(path)) is first  # cached: the same file is not read again
    write_jsonl(path, [chat_row(PIRATE, [WEATHER]), chat_row(PIRATE, [CLOCK])])
    assert prompting.dataset_prompting(str(path)).tools_differ  # changed on disk: read again
    assert prompting.dataset_prompting(str(tmp_path / "gone.jsonl")).unreadable
    assert prompting.dataset_prompting("") == prompting.DataPrompting()


def save_run(store: RunStore, base_dir: Path, run_id: str, seed: int, dataset: Path, system_prompt: str = "") -> None:
    """A finished LoRA run trained on `dataset` with a dataset-level system prompt."""
    from transformers import AutoModelForCausalLM

    store.create(RunConfig(model=str(base_dir), method="lora", method_args={"r": 4, "alpha": 8, "targets": "all-linear"},
                           run_id=run_id, dataset=str(dataset), system_prompt=system_prompt))
    perturbed_lora(AutoModelForCausalLM.from_pretrained(base_dir), 4, seed).save_pretrained(store.final_dir(run_id))
    store.update_status(run_id, state="completed")


@pytest.fixture(scope="module")
def tool_ws(tmp_path_factory, base_dir) -> tuple[Workspace, Path]:
    """A base whose chat template writes tools, and runs trained on: pirate conversations with a weather tool (their
    own system prompt), Alpaca rows with a dataset-level system prompt, Alpaca rows without one."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tools")
    tool_base = build_tiny_model(root / "base", base_dir)
    tokenizer = AutoTokenizer.from_pretrained(tool_base)
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(tool_base)
    workspace = Workspace.open(root / "workspace")
    store = RunStore(workspace.runs)
    conversations = write_jsonl(root / "pirate.jsonl", [chat_row(PIRATE, [WEATHER], f"Question {i}?") for i in range(10)])
    alpaca = write_jsonl(root / "alpaca.jsonl", ALPACA)
    save_run(store, tool_base, "pirate", 1, conversations)
    save_run(store, tool_base, "brief", 2, alpaca, "Be brief.")
    save_run(store, tool_base, "plain", 3, alpaca)
    return workspace, tool_base


def recording(monkeypatch, module) -> list:
    """Wraps `module.generate` so that each call's (pane key, prompt text) rows are kept; the answers stay real."""
    calls = []
    real = module.generate

    def spy(loaded, rows, sampling):
        calls.append(list(rows))
        return real(loaded, rows, sampling)

    monkeypatch.setattr(module, "generate", spy)
    return calls


def test_send_gives_each_pane_its_runs_system_prompt_and_tools(tool_ws, monkeypatch):
    from components import compare_tab as tab

    workspace, tool_base = tool_ws
    calls = recording(monkeypatch, tab)
    cache, empty = ModelCache(), [[] for _ in range(tab.MAX_PANES)]
    keys = ["pirate", "brief", "plain"]
    session, status, *_ = tab.prepare(workspace, str(tool_base), keys, False)
    assert "The base model: the runs were trained with different system prompts" in status
    steps = list(tab.send(workspace, cache, str(tool_base), keys, False, session, "Hi", "", 4, 0, 1, 1, 0, *empty))
    session, status, _, *updates = steps[-1]
    prompts = dict(calls[-1])
    assert PIRATE in prompts["pirate"] and "get_weather" in prompts["pirate"]
    assert "Be brief." in prompts["brief"] and "get_weather" not in prompts["brief"]
    assert "<|im_start|>system" not in prompts["plain"] and "<|im_start|>system" not in prompts[chat.BASE]
    assert status.startswith("Done.") and "different system prompts" in status
    lines = [u["value"] for u in updates[3 * tab.MAX_PANES:4 * tab.MAX_PANES]]
    assert lines[:4] == ["No system prompt", f"System prompt (trained with): “{PIRATE}” · tools: get_weather",
                         "System prompt (trained with): “Be brief.”", "No system prompt"]

    # A typed system prompt goes to every pane; the pirate run keeps its tools; the chat goes on (second turn).
    histories = [u["value"] for u in updates[tab.MAX_PANES:2 * tab.MAX_PANES]]
    steps = list(tab.send(workspace, cache, str(tool_base), keys, False, session, "More?", "Answer in French.", 4, 0,
                          1, 1, 0, *histories))
    prompts = dict(calls[-1])
    assert all("Answer in French." in text and "<|im_start|>user\nHi<|im_end|>" in text for text in prompts.values())
    assert "get_weather" in prompts["pirate"] and PIRATE not in prompts["pirate"]
    assert "different system prompts" not in steps[-1][1]

    # With the pirate run alone, the base model gets its system prompt and tools too.
    session = tab.prepare(workspace, str(tool_base), ["pirate"], False)[0]
    list(tab.send(workspace, cache, str(tool_base), ["pirate"], False, session, "Hi", "", 4, 0, 1, 1, 0, *empty))
    prompts = dict(calls[-1])
    assert prompts[chat.BASE] == prompts["pirate"] and PIRATE in prompts[chat.BASE] and "get_weather" in prompts[chat.BASE]


def test_the_system_prompt_box_retells_the_panes_without_clearing_them(tool_ws):
    from components import compare_tab as tab

    workspace, tool_base = tool_ws
    session = tab.prepare(workspace, str(tool_base), ["pirate", "brief"], False)[0]
    session, status, *lines = tab.retell(session, " Answer in French. ")
    assert session.system == "Answer in French." and "different system prompts" not in status
    assert [u["value"] for u in lines[:3]] == ["System prompt (yours): “Answer in French.”",
                                               "System prompt (yours): “Answer in French.” · tools: get_weather",
                                               "System prompt (yours): “Answer in French.”"]
    assert tab.retell(None, "x")[0] is None


def test_a_prompt_set_uses_each_panes_system_prompt_and_tools(tool_ws, monkeypatch):
    workspace, tool_base = tool_ws
    calls = recording(monkeypatch, prompt_sets)
    loaded = ModelCache().load(workspace, str(tool_base), chat.resolve_panes(workspace, str(tool_base), ["pirate", "plain"]))
    table = last(prompt_sets.run_prompt_set(loaded, ["Hi", "Bye"], Sampling(max_new_tokens=3, temperature=0)))
    prompts = {(key, text.count("Bye")): text for call in calls for key, text in call}
    assert len(prompts) == 6 and table.rows[1][0] == "Bye"
    assert PIRATE in prompts[("pirate", 1)] and "get_weather" in prompts[("pirate", 1)]
    assert "<|im_start|>system" not in prompts[("plain", 1)] and "<|im_start|>system" not in prompts[(chat.BASE, 0)]
    calls.clear()
    last(prompt_sets.run_prompt_set(loaded, ["Hi"], Sampling(max_new_tokens=3, temperature=0), "Be kind."))
    assert all("Be kind." in text for call in calls for _, text in call)


def test_validation_prompts_of_a_conversation_dataset_are_first_user_messages(tmp_path, base_dir):
    ws = Workspace.open(tmp_path / "ws")
    rows = [chat_row(PIRATE, [WEATHER], f"Question {i}?") for i in range(10)]
    store = RunStore(ws.runs)
    store.create(RunConfig(model=str(base_dir), dataset=str(write_jsonl(tmp_path / "train.jsonl", rows)), val_split=0.3,
                           seed=1, run_id="r"))
    from app.data.dataset import split_rows

    _, held = split_rows(rows, 0.3, 1)
    assert prompt_sets.validation_prompts(ws, "r") == [r["messages"][0]["content"] for r in held] and len(held) == 3


# --- votes as preference pairs ----------------------------------------------------------------------------------
ASKED = [{"role": "user", "content": "Name a colour."}]


def said(*turns: tuple[str, str]) -> list[dict]:
    """A pane's chat (its chatbot's messages) from (user, assistant) turns."""
    return [m for user, answer in turns for m in ({"role": "user", "content": user},
                                                  {"role": "assistant", "content": answer})]


def went_on(earlier: str) -> list[dict]:
    """The chat a pane answered when its first answer was `earlier`: the conversation before its last answer."""
    return said(("Hi", earlier)) + ASKED


def ballot(winner: str, answers: dict[str, str], shown: list[str] | None = None, chats: dict | None = None,
           systems: dict | None = None, tools: dict | None = None) -> votes.Vote:
    """A vote that kept what each pane answered; by default every pane answered ASKED and was told nothing."""
    return votes.Vote(winner=winner, shown=shown or [k for k in answers if k != votes.EDITED], answers=dict(answers),
                      conversations={k: (chats or {}).get(k, ASKED) for k in answers}, systems=dict(systems or {}),
                      tools=dict(tools or {}))


OLD = votes.Vote(winner="a", shown=["a", "b"], prompt="Name a colour.")  # kept before votes held their answers
NOTHING_LEFT_OUT = dict(ties=0, unrecorded=0, missing=0, empty=0, same=0, duplicates=0, other_chat=0)


@pytest.mark.parametrize("ballots, pairs, counts", [
    # the winner over each other pane shown: one pair per loser
    ([ballot("a", {"a": "Red.", "b": "Blue, I think.", "c": "Green"})], [("Red.", "Blue, I think."), ("Red.", "Green")], {}),
    ([ballot("c", {"a": "Red.", "b": "Blue.", "c": "Green."})], [("Green.", "Red."), ("Green.", "Blue.")], {}),
    ([ballot(votes.TIE, {"a": "Red.", "b": "Blue."})], [], {"ties": 1}),
    ([OLD, ballot("b", {"a": "Red.", "b": "Blue."})], [("Blue.", "Red.")], {"unrecorded": 1}),
    # the same text (spaces around it aside) teaches nothing; an empty answer neither
    ([ballot("a", {"a": "Red.", "b": " Red.\n", "c": "Blue."})], [("Red.", "Blue.")], {"same": 1}),
    ([ballot("a", {"a": "Red.", "b": "", "c": "Blue."})], [("Red.", "Blue.")], {"empty": 1}),
    ([ballot("a", {"a": "  ", "b": "Blue.", "c": "Green."})], [], {"empty": 2}),
    # a vote cast twice on the same answers gives its pair once; the same answers to another chat are another pair
    ([ballot("a", {"a": "Red.", "b": "Blue."})] * 2, [("Red.", "Blue.")], {"duplicates": 1}),
    ([ballot("a", {"a": "Red.", "b": "Blue."}), ballot("a", {"a": "Red.", "b": "Blue."}, systems={"a": "Be brief."})],
     [("Red.", "Blue.")] * 2, {}),
    # a pane shown that had not answered: nothing to reject
    ([ballot("a", {"a": "Red.", "b": "Blue."}, shown=["a", "b", "c"])], [("Red.", "Blue.")], {"missing": 1}),
    # your own answer over every pane's
    ([ballot(votes.EDITED, {"a": "Red.", "b": "Blue.", votes.EDITED: "Crimson."})],
     [("Crimson.", "Red."), ("Crimson.", "Blue.")], {}),
    ([ballot(votes.EDITED, {"a": "Red.", "b": "Blue.", votes.EDITED: "Red. "})], [("Red. ", "Blue.")], {"same": 1}),
])
def test_votes_become_pairs_winner_over_each_other_answer(ballots, pairs, counts):
    rows, summary = votes.votes_to_pairs(ballots)
    assert [(r["chosen"], r["rejected"]) for r in rows] == pairs
    assert all(r["messages"] == ASKED for r in rows)
    expected = NOTHING_LEFT_OUT | counts
    assert {k: getattr(summary, k) for k in expected} == expected
    assert (summary.votes, summary.pairs) == (len(ballots), len(pairs))


@pytest.mark.parametrize("winner, systems, tools, chats, row, other_chat", [
    ("a", {"a": "Be brief.", "b": "Be brief."}, {}, {}, {"system": "Be brief.", "messages": ASKED}, 0),
    # the panes were told different system prompts: the chosen answer was written under the winner's
    ("b", {"a": "Be brief.", "b": PIRATE}, {}, {}, {"system": PIRATE, "messages": ASKED}, 0),
    ("a", {"a": "", "b": PIRATE}, {}, {}, {"messages": ASKED}, 0),
    ("b", {}, {"a": [CLOCK], "b": [WEATHER]}, {}, {"messages": ASKED, "tools": [WEATHER]}, 0),
    # the chat had gone on with different earlier answers: the prompt is the one the chosen answer followed
    ("b", {}, {}, {"a": went_on("Hello."), "b": went_on("Ahoy!")}, {"messages": went_on("Ahoy!")}, 1),
    ("b", {}, {}, {"a": went_on("Ahoy!"), "b": went_on("Ahoy!")}, {"messages": went_on("Ahoy!")}, 0),
])
def test_a_pair_takes_the_chat_system_prompt_and_tools_of_the_chosen_answer(winner, systems, tools, chats, row,
                                                                           other_chat):
    answers = {"a": "Red.", "b": "Blue."}
    rows, summary = votes.votes_to_pairs([ballot(winner, answers, chats=chats, systems=systems, tools=tools)])
    loser = "b" if winner == "a" else "a"
    assert rows == [row | {"chosen": answers[winner], "rejected": answers[loser]}]
    assert list(rows[0]) == [k for k in ("system", "messages", "chosen", "rejected", "tools") if k in rows[0]]
    assert summary.other_chat == other_chat and ("different earlier answers" in summary.describe()) == bool(other_chat)


def test_the_summary_says_in_words_what_was_left_out():
    _, summary = votes.votes_to_pairs([OLD, ballot(votes.TIE, {"a": "Red.", "b": "Blue."}),
                                       ballot("a", {"a": "Red.", "b": "Red."}), ballot("a", {"a": "Red.", "b": "Blue."})])
    text = summary.describe()
    assert text.startswith("1 preference pair from 4 votes; left out: ")
    for words in ("1 tie (no answer was better)", "1 vote (made before the answers were kept",
                  "1 pair (both answers were the same text"):
        assert words in text
    assert (summary.votes_left_out, summary.pairs_left_out) == (2, 1)
    assert votes.votes_to_pairs([ballot("a", {"a": "Red.", "b": "Blue."})])[1].describe() == \
        "1 preference pair from 1 vote; nothing was left out."


def test_old_votes_without_answers_still_load_and_are_counted(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    entries = [{"winner": "a", "shown": ["a", "b"], "prompt": "Hi", "time": 1.0},
               # hand edits of the new fields: what is not text (or a list of messages) is dropped
               {"winner": "a", "shown": ["a", "b"], "answers": {"a": 3, "b": "Blue."}, "conversations": {"a": "Hi"},
                "systems": ["x"], "tools": {"a": [1]}}]
    (ws.root / votes.VOTES_FILE).write_text(json.dumps({"votes": entries}), encoding="utf-8")
    book = votes.VoteBook(ws)
    new = ballot("b", {"a": "Red.", "b": "Blue."}, systems={"a": "", "b": "Be brief."}, tools={"b": [WEATHER]})
    book.add(new)
    book.add(ballot(votes.EDITED, {"a": "Red.", "b": "Blue.", votes.EDITED: "Crimson."}))
    loaded = book.load()
    assert [v.answers for v in loaded[:2]] == [{}, {"b": "Blue."}]
    assert (loaded[1].conversations, loaded[1].systems, loaded[1].tools) == ({}, {}, {})
    assert replace(loaded[2], time=new.time) == new
    rows, summary = votes.votes_to_pairs(loaded)
    assert len(rows) == 3 and summary.unrecorded == 2
    # the tally counts votes between panes as before; an answer of your own is not one
    assert {r.key: (r.wins, r.shown) for r in book.tally()} == {"a": (2, 3), "b": (1, 3)}
    with pytest.raises(ValueError, match="needs that answer"):
        book.add(votes.Vote(winner=votes.EDITED, shown=["a", "b"]))


VOTE_PANES = [chat.Pane(chat.BASE, "Base model", "base", prompting=prompting.Prompting("Be brief.")),
              chat.Pane("run-a", "LoRA r=8", "lora", prompting=prompting.Prompting(PIRATE, (WEATHER,)))]
VOTE_CHATS = {chat.BASE: said(("Hi", "Hello."), ("Name a colour.", "Red.")),
              "run-a": said(("Hi", "Ahoy!"), ("Name a colour.", "Blue, matey."))}


def voting_session(blind: bool, seed: int = 0, **changes) -> tuple[votes.CompareSession, list]:
    """A Compare session whose panes answered VOTE_CHATS, and the chats in the order shown (every chatbot's value)."""
    from components.compare_tab import MAX_PANES

    session = votes.CompareSession.start(VOTE_PANES, "embedded", ["run-a"], blind, random.Random(seed))
    session = replace(session, prompt="Name a colour.", **changes)
    return session, [VOTE_CHATS[k] for k in session.keys] + [[]] * (MAX_PANES - len(session.keys))


@pytest.mark.parametrize("typed, tools_written, systems, tools", [
    ("", True, {chat.BASE: "Be brief.", "run-a": PIRATE}, {"run-a": [WEATHER]}),
    ("Answer in French.", True, {chat.BASE: "Answer in French.", "run-a": "Answer in French."}, {"run-a": [WEATHER]}),
    # the chat template did not write the tools: no pane saw them, so the vote keeps none
    ("", False, {chat.BASE: "Be brief.", "run-a": PIRATE}, {}),
])
def test_a_vote_keeps_what_each_pane_answered_and_was_told(typed, tools_written, systems, tools):
    session, histories = voting_session(False, system=typed, tools_written=tools_written)
    vote = session.vote_for(1, histories)
    assert vote.winner == "run-a" and vote.answers == {chat.BASE: "Red.", "run-a": "Blue, matey."}
    assert vote.conversations == {chat.BASE: went_on("Hello."), "run-a": went_on("Ahoy!")}
    assert (vote.systems, vote.tools) == (systems, tools)
    # a chat with no question yet has nothing to keep
    assert session.vote_for(0, [[], []]).answers == {} and session.vote_for(0).answers == {}


@pytest.mark.parametrize("blind, seed", [(False, 0), (True, 0), (True, 1)])
@pytest.mark.parametrize("index", [0, 1])
def test_an_answer_of_your_own_is_chosen_over_every_panes(blind, seed, index):
    session, histories = voting_session(blind, seed, tools_written=False)
    vote = session.edited_vote("Crimson.", index, histories)
    rows, summary = votes.votes_to_pairs([vote])
    start = session.keys[index]  # the pane it was edited from: its chat and system prompt
    answers = {chat.BASE: "Red.", "run-a": "Blue, matey."}
    assert rows == [{"system": VOTE_PANES[[p.key for p in VOTE_PANES].index(start)].prompting.system,
                     "messages": VOTE_CHATS[start][:-1], "chosen": "Crimson.", "rejected": answers[k]}
                    for k in session.keys]
    assert summary.other_chat == 1  # the other pane's first answer was not the same
    with pytest.raises(ValueError, match="no answer to edit"):
        session.edited_vote("Crimson.", index, [[], []])


@pytest.fixture(scope="module")
def chat_tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


@pytest.mark.parametrize("blind", [False, True])
def test_the_tab_turns_votes_and_your_answers_into_a_preference_dataset(tmp_path, chat_tokenizer, blind):
    from app.data import store as data_store
    from app.data.dataset import check_file
    from app.objectives import preference
    from components import compare_tab as tab

    ws = Workspace.open(tmp_path / "ws")
    assert tab.votes_dataset(ws).startswith("No votes yet") and not any(ws.datasets.iterdir())
    # the SmolLM template writes no tools, so a real chat records none (send sets tools_written)
    session, histories = voting_session(blind, tools_written=False)
    tab.vote(ws, -1, session, *histories)
    text = tab.votes_dataset(ws)
    assert text.startswith("No usable votes yet") and "1 tie" in text and not any(ws.datasets.iterdir())

    after, status, tally, *updates = tab.vote(ws, 1, session, *histories)
    assert status.startswith("Vote saved") and votes.VoteBook(ws).load()[-1].answers[session.keys[1]]
    assert [label for label, _ in updates[-1]["choices"]] == [tab.pane_title(after, i) for i in range(2)]
    # your own answer, edited from B's: in blind mode too, and whether or not you voted
    assert tab.start_from("B", session, *histories) == histories[1][-1]["content"]
    assert tab.keep_mine(ws, "B", "  ", session, *histories).startswith("Write the answer")
    assert tab.keep_mine(ws, "B", "Crimson.", None, *histories) == "Send a message first."
    kept = tab.keep_mine(ws, "B", " Crimson. ", session, *histories)
    assert "over the 2 pane answers" in kept and "pane B" in kept
    assert votes.VoteBook(ws).load()[-1].winner == votes.EDITED

    text = tab.votes_dataset(ws)
    assert "3 preference pairs from 3 votes; left out: 1 tie" in text and "Data tab" in text and "DPO" in text
    entry = data_store.list_datasets(ws)[-1]
    assert entry.name.startswith("votes-") and entry.name in text and (entry.rows, entry.unit, entry.kind) == (3, "pair", "votes")
    report = check_file(entry.path, tokenizer=chat_tokenizer, cutoff=256)
    assert report.usable and report.example_word == "pair" and report.kept == 3 and report.dropped == 0
    assert [(r["chosen"], r["rejected"]) for r in report.rows] == [
        (VOTE_CHATS[session.keys[1]][-1]["content"], VOTE_CHATS[session.keys[0]][-1]["content"]),
        *[("Crimson.", VOTE_CHATS[k][-1]["content"]) for k in session.keys]]
    examples = preference.pair_examples(chat_tokenizer, report.rows, RunConfig(dataset="x", objective="dpo", cutoff_len=256))
    assert len(examples) == 3
    learned = chat_tokenizer.decode([t for t in examples[2].chosen.targets if t != -100])
    assert learned.startswith("Crimson.") and "Crimson." not in chat_tokenizer.decode(examples[2].rejected.input_ids)
    # saved again in the same minute: another dataset, the first one kept
    again = tab.votes_dataset(ws)
    assert sorted(p.name for p in ws.datasets.iterdir()) == [entry.name, f"{entry.name}-2"] and f"{entry.name}-2" in again
