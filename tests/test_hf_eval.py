"""transformers Auto classes, `mudd generate`, `mudd eval` (perplexity and the lm-eval bridge)."""

import json
import math

import pytest
import torch
from conftest import FIXTURE_NAMES, FIXTURE_TOL, assert_one_line_error, build, randomize_connection
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from muddformer import MuddConfig, MuddForCausalLM, MuddModel
from muddformer.adapters.hf import CACHE_NAME, MuddHFConfig, MuddPythiaForCausalLM
from muddformer.data.corpus import bundled_split
from muddformer.data.tokenizers import export_tokenizer, load_tokenizer
from muddformer.errors import DependencyError, InputError
from muddformer.evaluation.harness import LOCAL_TASK, local_task_items, local_tasks_dir
from muddformer.evaluation.perplexity import perplexity
from muddformer.inference.generation import generate
from muddformer.model import next_token_loss


@pytest.fixture(scope="module")
def model_dir(play_data, tmp_path_factory):
    """A small random MUDD model in our format with the 512-token BPE of `play_data` beside it."""
    torch.manual_seed(0)
    cfg = MuddConfig.from_preset("nano").replace(block_size=128)
    core = MuddModel(cfg)
    randomize_connection(core)
    folder = tmp_path_factory.mktemp("model") / "nano"
    MuddForCausalLM(MuddHFConfig.from_mudd(cfg), model=core).save_pretrained(folder)
    export_tokenizer(play_data / "tokenizer.json", folder, cfg.block_size)
    return folder


# ---- transformers ------------------------------------------------------------------------------
def test_auto_classes_round_trip_our_folder(model_dir):
    config = AutoConfig.from_pretrained(model_dir)
    assert type(config) is MuddHFConfig and config.num_hidden_layers == 2 and config.max_position_embeddings == 128
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model) is MuddForCausalLM
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "Shall I compare thee to a summer's day?"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == load_tokenizer(model_dir / "tokenizer.json").encode(text).ids
    assert tok.decode(ids[0]) == text
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).logits, MuddForCausalLM.from_pretrained(model_dir).model(ids).logits, rtol=0, atol=0
        )
    # labels -> loss equals the shifted cross-entropy
    out = model(ids, labels=ids)
    assert torch.allclose(out.loss, next_token_loss(out.logits[:, :-1], ids[:, 1:]))


def test_transformers_trainer_with_gradient_accumulation_takes_the_step_of_the_whole_batch(model_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "labels": row} for row in ids]

    def one_step(batch_size, accumulate):
        model = MuddForCausalLM.from_pretrained(model_dir)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"t{accumulate}"),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulate,
            max_steps=1,
            learning_rate=1.0,
            optim="sgd",
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
        )
        Trainer(model=model, args=args, train_dataset=rows).train()
        return model.model.tok_embeddings.weight.detach()

    start = MuddForCausalLM.from_pretrained(model_dir).model.tok_embeddings.weight.detach()
    whole, accumulated = one_step(2, 1) - start, one_step(1, 2) - start
    assert whole.abs().max() > 1e-3
    torch.testing.assert_close(accumulated, whole, atol=1e-6, rtol=1e-4)  # not 2x: the loss is divided by 2


def test_save_pretrained_keeps_edited_token_ids_and_refuses_other_config_edits(model_dir, tmp_path):
    model = MuddForCausalLM.from_pretrained(model_dir)
    model.config.eos_token_id = 7  # the transformers way to change what ends a text
    model.save_pretrained(tmp_path / "a")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert again.model.config.eos_token_id == again.generation_config.eos_token_id == 7
    again.generation_config.eos_token_id = [7, 8]  # the generation config's edit comes first
    again.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["eos_token_id"] == [7, 8]
    assert MuddForCausalLM.from_pretrained(tmp_path / "b").generation_config.eos_token_id == [7, 8]
    again.config.n_layer = 5
    with pytest.raises(InputError, match="model.config.n_layer was changed to 5 but the model was built with 2"):
        again.save_pretrained(tmp_path / "c")


def left_padded_batch(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    prompts = ["O Romeo, Romeo!", "Now is the winter of our discontent made glorious summer"]
    return tok, tok(prompts, return_tensors="pt", padding=True)


SAMPLING = [
    dict(do_sample=False),
    dict(do_sample=True, top_k=20),
    dict(do_sample=True, temperature=0.8, top_k=50),
    dict(do_sample=True, top_p=0.9),
    dict(do_sample=False, repetition_penalty=1.3),
]


@pytest.mark.slow
@pytest.mark.parametrize("options", SAMPLING, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_hf_generate_equals_ours_token_for_token(model_dir, options):
    # A left-padded batch through transformers' GenerationMixin and through our own decoder, with the same
    # global RNG state for sampling: the same tokens, whatever name transformers gives the KV cache.
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok, batch = left_padded_batch(model_dir)
    torch.manual_seed(7)
    # top_k=None: transformers' generation config would otherwise apply its default top-k of 50
    hf = model.generate(**batch, max_new_tokens=12, pad_token_id=tok.pad_token_id, **{"top_k": None, **options})
    torch.manual_seed(7)
    ours = generate(model.model, batch.input_ids, 12, attention_mask=batch.attention_mask, **options)
    assert hf.tolist() == ours.tolist()
    if options["do_sample"]:  # the RNG matters: another seed gives other tokens
        torch.manual_seed(8)
        assert (
            generate(model.model, batch.input_ids, 12, attention_mask=batch.attention_mask, **options).tolist()
            != ours.tolist()
        )


def test_hf_generate_carries_the_cache_from_step_to_step(model_dir):
    # If the cache were ever dropped (as when transformers renamed it), each decode step would see only its
    # own token: the cache must grow by exactly one position per step, and every step's logits must equal the
    # full forward's at that position.
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    seen = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # none before the prompt in older releases
        seen.append((kwargs["input_ids"].shape[1], 0 if cache is None else cache.get_seq_length()))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    prompt = torch.tensor([[5, 17, 99, 3, 250, 41, 7]])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    handle.remove()
    P = prompt.shape[1]
    assert seen == [(P, 0)] + [(1, P + i) for i in range(5)]
    with torch.no_grad():
        full = model(out.sequences).logits[0]
    for i, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0], full[P - 1 + i], atol=2e-5, rtol=1e-5)


def test_hf_forward_and_generate_print_no_deprecation_warning(model_dir, caplog, recwarn):
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers").warning_once.cache_clear()  # warnings shown once per process
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[5, 17, 99]])
    with caplog.at_level("WARNING"):
        with torch.no_grad():
            out = model(ids, use_cache=True)
            model(ids[:, -1:], **{CACHE_NAME: getattr(out, CACHE_NAME)})
        model.generate(ids, max_new_tokens=3, do_sample=False)
    messages = [r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn]
    assert not [m for m in messages if "deprecat" in m.lower()], messages


def test_forward_refuses_a_cache_under_a_name_it_does_not_read(model_dir):
    from transformers import DynamicCache

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(DependencyError, match="KV cache as 'cache_params'"):
        model(torch.tensor([[5, 17]]), cache_params=DynamicCache(config=model.config))
    # transformers' own preallocated cache keeps its tensors in a layout our attention does not read
    with pytest.raises(InputError, match="transformers' StaticCache is not one muddformer decodes with"):
        model.generate(torch.tensor([[5, 17]]), max_new_tokens=2, do_sample=False, cache_implementation="static")


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_auto_model_loads_published_folders(fixtures_dir, name):
    from safetensors.torch import load_file

    model = AutoModelForCausalLM.from_pretrained(fixtures_dir / name)
    assert isinstance(model, MuddPythiaForCausalLM if name == "mp_tiny" else MuddForCausalLM)
    exp = load_file(fixtures_dir / name / "expected.safetensors")
    with torch.no_grad():
        assert (model(exp["input_ids"]).logits - exp["logits"]).abs().max().item() <= FIXTURE_TOL[name]
    assert model.generate(exp["prompt_ids"], max_new_tokens=9, do_sample=False).tolist() == exp["greedy_ids"].tolist()


# ---- mudd generate -----------------------------------------------------------------------------
def test_generate_cli_streams_text_and_reports_speed(model_dir, tmp_path, run_cli):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be, or not to be\n\nFriends, Romans, countrymen\n")
    proc = run_cli(
        "generate",
        model_dir,
        "--prompt",
        "Once more unto the breach",
        "--prompt-file",
        prompts,
        "--max-new-tokens",
        6,
        "--ignore-eos",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert proc.stdout.startswith("Once more unto the breach")
    assert any(line.startswith("Friends, Romans, countrymen") for line in lines)
    assert "18 tokens in" in proc.stderr and "tokens/s" in proc.stderr
    # greedy by default: the same text twice
    again = run_cli(
        "generate", model_dir, "--prompt", "Once more unto the breach", "--max-new-tokens", 6, "--ignore-eos"
    )
    assert again.stdout.splitlines()[0] == lines[0]


def test_generate_and_eval_refusals(model_dir, tmp_path, fixtures_dir, run_cli):
    assert_one_line_error(run_cli("generate", model_dir, "--prompt", "word " * 200), "exceeds the context")
    assert_one_line_error(run_cli("generate", fixtures_dir / "mf_tiny", "--prompt", "hi"), "tokenizer.json")
    assert_one_line_error(run_cli("eval", fixtures_dir / "mf_tiny", "--ppl", "x.txt"), "tokenizer.json")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    (other / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    assert_one_line_error(run_cli("generate", other, "--prompt", "hi"), "not a MUDD model")
    assert_one_line_error(run_cli("eval", other, "--ppl", "x.txt"), "not a MUDD model")
    assert_one_line_error(run_cli("eval", model_dir), "nothing to evaluate")
    assert_one_line_error(run_cli("eval", model_dir, "--ppl", tmp_path / "missing.txt"), "does not exist")


# ---- mudd eval --ppl ---------------------------------------------------------------------------
@pytest.mark.parametrize("window, stride", [(8, 3), (8, 4), (8, 8), (5, 5), (2, 1), (2, 2)])
def test_sliding_window_scores_every_token_once_in_its_window(window, stride):
    """Each token's loss equals a forward of its own context (the tokens of its window before it), summed once."""
    model = build(1).eval()
    randomize_connection(model)
    for length in (40, 37):
        ids = torch.randint(0, 97, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        got = perplexity(model, ids, n_bytes=length, window=window, stride=stride)
        nll, scored, start, contexts = 0.0, 1, 0, []
        while scored < length:  # the documented windows: start + k x stride, never past the token before
            start = min(start, scored - 1)
            end = min(start + window, length)
            for i in range(scored, end):
                with torch.no_grad():
                    logits = model(torch.tensor([ids[start:i]])).logits[0, -1].double()
                nll -= torch.log_softmax(logits, -1)[ids[i]].item()
                contexts.append(i - start)
            scored, start = end, start + stride
        assert got.tokens == len(contexts) == length - 1 and 1 <= min(contexts) and max(contexts) <= window - 1
        assert got.nll == pytest.approx(nll, rel=1e-5)
    with pytest.raises(InputError, match=r"need 2 <= window \(1\)"):
        perplexity(model, ids, 1, window=1)
    with pytest.raises(InputError, match=r"0 < stride \(0\) <= window"):
        perplexity(model, ids, 1, window=8, stride=0)


def test_eval_perplexity_equals_the_direct_loss(model_dir, tmp_path, run_cli):
    text = bundled_split("val")[0][:200]
    path = tmp_path / "short.txt"
    path.write_text(text)
    encoding = load_tokenizer(model_dir / "tokenizer.json").encode(text)
    ids, first = encoding.ids, text[: encoding.offsets[0][1]]
    assert len(ids) <= 128  # one window: the perplexity is the plain mean loss
    scored_bytes = len(text.encode()) - len(first.encode())  # the first token is not scored: nor are its bytes
    assert first and text.startswith(first)
    model = MuddForCausalLM.from_pretrained(model_dir).model
    with torch.no_grad():
        x = torch.tensor([ids])
        loss = next_token_loss(model(x[:, :-1]).logits, x[:, 1:]).item()
    out = tmp_path / "ppl.json"
    proc = run_cli("eval", model_dir, "--ppl", path, "--output", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())["perplexity"]
    assert report["tokens"] == len(ids) - 1 and report["bytes"] == scored_bytes
    assert report["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(loss * (len(ids) - 1) / (scored_bytes * math.log(2)), rel=1e-5)
    assert f"perplexity {math.exp(loss):.3f}" in proc.stdout


# ---- lm-eval -----------------------------------------------------------------------------------
def test_local_task_is_deterministic_and_well_formed(tmp_path):
    items = local_task_items()
    assert items == local_task_items() and len(items) == 300
    for item in items:
        assert len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
    folder = local_tasks_dir(tmp_path)
    rows = [json.loads(line) for line in (folder / f"{LOCAL_TASK}.jsonl").read_text().splitlines()]
    assert rows == items
    assert str((folder / f"{LOCAL_TASK}.jsonl").resolve()) in (folder / f"{LOCAL_TASK}.yaml").read_text()


def choice_loglikelihood(model, tok, context: str, choice: str) -> float:
    """Sum of log-probabilities of the choice's tokens after the context, split as lm-eval splits them."""
    whole = tok(context + choice).input_ids
    n_ctx = len(tok(context).input_ids)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return sum(logp[t - 1, whole[t]].item() for t in range(n_ctx, len(whole)))


@pytest.mark.slow
def test_lm_eval_on_the_local_task_equals_our_own_scoring(model_dir, tmp_path, run_cli):
    out = tmp_path / "results.json"
    proc = run_cli("eval", model_dir, "--tasks", LOCAL_TASK, "--limit", 24, "--batch-size", 4, "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert LOCAL_TASK in proc.stdout and "acc" in proc.stdout  # lm-eval's table
    acc = json.loads(out.read_text())["lm_eval"]["results"][LOCAL_TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0
    model = MuddForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    items = local_task_items()[:24]
    correct = [
        max(range(4), key=lambda c: choice_loglikelihood(model, tok, it["context"], it["choices"][c])) == it["label"]
        for it in items
    ]
    assert acc == pytest.approx(sum(correct) / len(items))


def test_lm_eval_refusals(model_dir, tmp_path, run_cli):
    assert_one_line_error(
        run_cli("eval", model_dir, "--tasks", "shakespeare_next_lin"), "unknown lm-eval task", LOCAL_TASK
    )
    assert_one_line_error(
        run_cli("eval", model_dir, "--tasks", LOCAL_TASK, "--include-path", tmp_path / "nope"), "--include-path"
    )


def test_lm_evals_own_tasks_are_indexed_only_when_asked_for(monkeypatch, tmp_path):
    # Indexing lm-eval's few thousand task YAMLs takes seconds; the local task alone needs none of them. The
    # real indexes are read by the two tests above (the local one, and the full one for the unknown name).
    import lm_eval.tasks

    from muddformer.evaluation.harness import task_manager

    made = []

    class RecordedIndex:
        def __init__(self, include_path, include_defaults=True):
            made.append((len(include_path), include_defaults))
            self.all_tasks = [LOCAL_TASK] + (["hellaswag"] if include_defaults else [])

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", RecordedIndex)
    assert task_manager([LOCAL_TASK], []).all_tasks == [LOCAL_TASK] and made == [(1, False)]
    made.clear()
    assert "hellaswag" in task_manager(["hellaswag", LOCAL_TASK], []).all_tasks and made == [(1, False), (1, True)]
    made.clear()
    task_manager([LOCAL_TASK], [str(tmp_path)])  # a user's folder may group lm-eval's tasks: the full index
    assert made == [(2, True)]
    made.clear()
    with pytest.raises(InputError, match="unknown lm-eval task 'hellaswog' \\(did you mean hellaswag"):
        task_manager(["hellaswog"], [])


def test_lm_eval_tokenizer_takes_the_special_tokens_of_tokenizer_config(tmp_path):
    from tokenizers import Tokenizer, models, trainers

    from muddformer.evaluation.harness import hf_tokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.train_from_iterator(["to be or not to be"] * 20, trainers.BpeTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))  # a Llama-like vocabulary: no <|endoftext|>
    with pytest.raises(InputError, match="names no end-of-text token; add eos_token to a tokenizer_config.json"):
        hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    loaded = hf_tokenizer(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 2)
