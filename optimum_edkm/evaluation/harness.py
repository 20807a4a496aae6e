"""lm-evaluation-harness on an in-memory (palettized) model, with tasks built from offline text.

The ``lm_eval`` command line cannot load a palettized checkpoint (it does not import optimum_edkm, so
transformers does not know the ``"edkm"`` quantization method); its Python API can: ``HFLM`` accepts a
``PreTrainedModel`` object. :func:`write_help_topic_tasks` writes two local tasks (YAML + JSONL, read with
``dataset_path: json``, nothing downloaded) over a split of the offline Python help topics
(:func:`optimum_edkm.data.load_text`); :func:`run_lm_eval` scores a model on them (or on any task lm-eval
knows, when it can reach the data).

* ``edkm_help_topics_mc`` - multiple choice: a paragraph's first half is the context, the choices are its own
  second half and the second halves of ``choices - 1`` other paragraphs (seeded); metrics ``acc``, ``acc_norm``;
* ``edkm_help_topics_ppl`` - rolling log-likelihood of every paragraph (as lm-eval's ``wikitext``);
  metrics ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``.

The ``evaluate`` library ships no metric code in its wheel: ``evaluate.load("accuracy")`` (or
``"perplexity"``) downloads the metric script from the Hugging Face Hub, so it fails offline; lm-eval computes
its metrics itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Optional, Sequence

MC_TASK = "edkm_help_topics_mc"
PPL_TASK = "edkm_help_topics_ppl"
TASKS = (MC_TASK, PPL_TASK)
#: paragraphs shorter than this are headings or boilerplate ("See also: ...")
MIN_PARAGRAPH_CHARS = 120
#: longer paragraphs are code listings or tables; they also keep every item inside a small model's context
MAX_PARAGRAPH_CHARS = 600


@dataclasses.dataclass(frozen=True)
class TaskFiles:
    """Where the tasks were written (pass ``folder`` as lm-eval's ``include_path``) and how many items each has."""

    folder: str
    multiple_choice_items: int
    perplexity_documents: int
    split: str


def paragraphs(
    documents: Sequence[str], min_chars: int = MIN_PARAGRAPH_CHARS, max_chars: int = MAX_PARAGRAPH_CHARS
) -> list:
    """Prose paragraphs of ``documents`` (blank-line separated), whitespace collapsed, in order, no duplicates."""
    seen, found = set(), []
    for document in documents:
        for block in document.split("\n\n"):
            text = " ".join(block.split())
            if min_chars <= len(text) <= max_chars and text not in seen and not text.startswith(">>>"):
                seen.add(text)
                found.append(text)
    return found


def multiple_choice_items(texts: Sequence[str], choices: int = 4, seed: int = 0) -> list:
    """``{"context", "choices", "label"}`` items: the true second half of a paragraph among the second halves of
    ``choices - 1`` other paragraphs, in a seeded random order."""
    if choices < 2:
        raise ValueError(f"choices must be >= 2, got {choices}")
    if len(texts) < choices:
        raise ValueError(f"{len(texts)} paragraphs cannot make items with {choices} choices; use more text")
    halves = []
    for text in texts:
        words = text.split(" ")
        cut = len(words) // 2
        halves.append((" ".join(words[:cut]), " ".join(words[cut:])))
    generator = random.Random(seed)
    items = []
    for position, (context, ending) in enumerate(halves):
        others = generator.sample([i for i in range(len(halves)) if i != position], choices - 1)
        options = [ending] + [halves[i][1] for i in others]
        order = list(range(choices))
        generator.shuffle(order)
        items.append({"context": context, "choices": [options[i] for i in order], "label": order.index(0)})
    return items


def _task_yaml(name: str, data_file: str, body: str) -> str:
    return (
        f"task: {name}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n"
        f"  data_files:\n"
        f"    test: {json.dumps(data_file)}\n"
        f"test_split: test\n"
        f"{body}"
        f"metadata:\n"
        f"  version: 1.0\n"
    )


def write_help_topic_tasks(
    folder,
    split: str = "evaluation",
    choices: int = 4,
    max_items: Optional[int] = None,
    seed: int = 0,
    source: Optional[str] = None,
) -> TaskFiles:
    """Write both tasks under ``folder`` from ``split`` of the help topics (or from ``source``: a file, folder
    or datasets id, see :func:`optimum_edkm.data.load_text`)."""
    from ..data import load_text

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    text = load_text(source, split=split if source is None else None)
    found = paragraphs(text.documents)
    if max_items is not None:
        found = found[:max_items]
    items = multiple_choice_items(found, choices=choices, seed=seed)
    mc_data, ppl_data = folder / f"{MC_TASK}.jsonl", folder / f"{PPL_TASK}.jsonl"
    mc_data.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    ppl_data.write_text("".join(json.dumps({"text": paragraph}) + "\n" for paragraph in found), encoding="utf-8")
    (folder / f"{MC_TASK}.yaml").write_text(
        _task_yaml(
            MC_TASK,
            str(mc_data),
            (
                "output_type: multiple_choice\n"
                'doc_to_text: "{{context}}"\n'
                'doc_to_choice: "{{choices}}"\n'
                'doc_to_target: "{{label}}"\n'
                "metric_list:\n"
                "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
            ),
        ),
        encoding="utf-8",
    )
    (folder / f"{PPL_TASK}.yaml").write_text(
        _task_yaml(
            PPL_TASK,
            str(ppl_data),
            (
                "output_type: loglikelihood_rolling\n"
                'doc_to_text: ""\n'
                'doc_to_target: "{{text}}"\n'
                "metric_list:\n"
                "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
            ),
        ),
        encoding="utf-8",
    )
    return TaskFiles(str(folder), len(items), len(found), text.split)


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str] = TASKS,
    include_path=None,
    *,
    batch_size: int = 1,
    max_length: Optional[int] = None,
    limit=None,
    include_defaults: bool = False,
    **kwargs,
) -> dict:
    """``lm_eval.simple_evaluate`` on an in-memory model (e.g. a palettized one); returns lm-eval's results dict.

    ``include_path`` is the folder of :func:`write_help_topic_tasks` (or of your own task YAMLs);
    ``include_defaults=False`` skips indexing lm-eval's hundreds of built-in tasks (set it to use them).
    Extra keyword arguments go to ``simple_evaluate``.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(
            "lm-evaluation-harness is not installed: pip install 'optimum-edkm[eval]' (or pip install lm-eval)"
        ) from error
    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(
            f"include_path {include_path} is not a folder of task YAMLs; write the tasks with "
            f"optimum_edkm.evaluation.harness.write_help_topic_tasks(folder) first"
        )
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=str(device))
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        log_samples=kwargs.pop("log_samples", False),
        **kwargs,
    )
