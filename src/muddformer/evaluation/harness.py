"""The lm-evaluation-harness bridge of `mudd eval --tasks`, and the small local task we ship.

lm-eval's built-in tasks download their datasets; the local task `shakespeare_next_line` is made
from the bundled corpus's validation plays, so the whole path runs offline. Each item shows the
end of a speech's opening line and asks which of four lines comes next (three come from other
speeches of the same play); a model that learned nothing scores about 0.25.
"""

from __future__ import annotations

import difflib
import json
import os
import random
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from muddformer._utils import atomic_path
from muddformer.data.corpus import VALIDATION_PLAYS, bundled_plays, cache_dir
from muddformer.data.tokenizers import tokenizer_file
from muddformer.errors import InputError

LOCAL_TASK = "shakespeare_next_line"
LOCAL_TASK_ITEMS = 300  # items in the local task (100 per validation play)
LOCAL_TASK_SEED = 20250217

_TASK_YAML = """\
# Written by muddformer (`mudd eval`): pick the line that follows in a Shakespeare speech.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _speech_lines(text: str) -> list[list[str]]:
    """Speeches of a play as lists of verse lines (a speech starts after a 'NAME:' line)."""
    speeches, current = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith(":") and stripped[:-1].replace(" ", "").isupper():
            current = [stripped]
            speeches.append(current)
        elif not stripped:
            current = None
        elif current is not None:
            current.append(stripped)
    return [s for s in speeches if len(s) >= 3 and all(len(line) >= 12 for line in s[1:3])]


def local_task_items(n: int = LOCAL_TASK_ITEMS, seed: int = LOCAL_TASK_SEED) -> list[dict]:
    """The task's items, the same on every machine: context, four choices, index of the true one."""
    rng = random.Random(seed)
    plays = {p["name"]: p["text"] for p in bundled_plays()}
    items = []
    per_play = n // len(VALIDATION_PLAYS)
    for name in VALIDATION_PLAYS:
        speeches = _speech_lines(plays[name])
        for speech in rng.sample(speeches, min(per_play, len(speeches))):
            true_line = speech[2]
            # Distractors of about the same length, so that length alone does not give the answer.
            pool = sorted(
                {
                    line
                    for s in speeches
                    if s is not speech
                    for line in s[1:]
                    if line != true_line and abs(len(line) - len(true_line)) <= 0.2 * len(true_line)
                }
            )
            choices = rng.sample(pool, 3) + [true_line]
            rng.shuffle(choices)
            items.append(
                {
                    "context": f"{speech[0]}\n{speech[1]}\n",
                    "choices": choices,
                    "label": choices.index(true_line),
                    "play": name,
                }
            )
    return items


def local_tasks_dir(root: str | os.PathLike | None = None) -> Path:
    """Write the local task (data + YAML with its absolute data path) once; returns its folder."""
    folder = Path(root) if root is not None else cache_dir() / "lm_eval_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{LOCAL_TASK}.jsonl"
    yaml = folder / f"{LOCAL_TASK}.yaml"
    rows = "".join(json.dumps(item) + "\n" for item in local_task_items())
    spec = _TASK_YAML.format(task=LOCAL_TASK, data=json.dumps(str(data.resolve())))
    for path, content in ((data, rows), (yaml, spec)):
        if not path.is_file() or path.read_text(encoding="utf-8") != content:
            with atomic_path(path) as tmp:
                Path(tmp).write_text(content, encoding="utf-8")
    return folder


def hf_tokenizer(folder: str | os.PathLike, tokenizer: str | os.PathLike | None = None):
    """A transformers fast tokenizer from a folder's tokenizer.json (or the given file), with the special tokens its
    tokenizer_config.json names (a converted Llama's <s> and </s>), else <|endoftext|> as start and end."""
    path = tokenizer_file(folder, tokenizer)
    if path.name == "tokenizer.json" and (path.parent / "tokenizer_config.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(str(path.parent))
    else:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    if tok.eos_token is None and "<|endoftext|>" in tok.get_vocab():
        tok.eos_token = tok.bos_token = "<|endoftext|>"
    if tok.eos_token is None:  # lm-eval starts and ends texts with it
        raise InputError(
            f"tokenizer {path} names no end-of-text token; add eos_token to a tokenizer_config.json beside it "
            "(as transformers writes one)"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise InputError("lm-eval is not installed; install it with: pip install 'muddformer[eval]'") from None


def check_task_names(task_manager, tasks: list[str]) -> None:
    known = set(task_manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise InputError(
                f"unknown lm-eval task {name!r}{hint}; list tasks with `lm-eval ls tasks`, "
                f"or add a folder of task YAMLs with --include-path"
            )


def task_manager(tasks: list[str], include_path: list[str]):
    """lm-eval's index of the tasks, with our bundled local tasks. Where only those are asked for, lm-eval's own
    few thousand task YAMLs are left unread: indexing them takes seconds (tens on a busy machine). A folder of
    the user's may hold groups of lm-eval's tasks, so it always comes with the full index."""
    from lm_eval.tasks import TaskManager

    for p in include_path:
        if not Path(p).is_dir():
            raise InputError(f"--include-path {p} is not a folder of task YAMLs")
    paths = [str(local_tasks_dir()), *include_path]
    if not include_path:
        local = TaskManager(include_path=paths, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=paths)
    check_task_names(manager, tasks)
    return manager


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    include_path: list[str] | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    seed: int = 1234,
) -> dict:
    """Evaluate a MuddForCausalLM on lm-eval tasks; returns lm-eval's results dict (samples left out)."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, [str(p) for p in include_path or []])
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        backend="causal",
        batch_size=batch_size,
        max_length=model.config.block_size,
    )
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return results


def results_json(results: dict) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"


def results_table(results: dict) -> str:
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
