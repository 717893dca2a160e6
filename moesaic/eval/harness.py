"""A moesaic checkpoint as a model of the Language Model Evaluation Harness (`lm-eval`, the
`eval` extra), registered as "moesaic" when this module is imported:

    python -m moesaic.eval.harness --model moesaic --model_args path=CKPT --tasks TASK \
        [--include_path DIR_OF_TASK_YAMLS] [--limit N] [--batch_size 8]

The command is lm-eval's own (`lm_eval run ...`, every option of it), run after the
registration; `lm_eval --model moesaic` alone does not know the name unless moesaic is
registered through an entry point. From Python: `import moesaic.eval.harness` and then
`lm_eval.simple_evaluate(model="moesaic", model_args="path=CKPT", ...)`.

model_args: path (the checkpoint), max_length (default: the data.seq_len it trained on),
batch_size (default 8). Requests:
  loglikelihood          (context, continuation): summed log-probability of the
                         continuation's tokens and whether greedy decoding yields them; the
                         context is cut from the left to fit, an empty one is the eos token.
  loglikelihood_rolling  a text's log-probability in windows of max_length tokens
                         (lm-eval's `get_rolling_token_windows`, eos first).
  generate_until         greedy (or `temperature` > 0 with `do_sample`) decoding with the KV
                         cache (moesaic.eval.generate), at most `max_gen_toks`, cut at the first
                         `until` string.
Nothing here is imported by the rest of moesaic: lm-eval stays optional.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import yaml
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from moesaic.data.tokenizer import load_tokenizer
from moesaic.eval import perplexity
from moesaic.eval.generate import generate
from moesaic.eval.tasks import Item, continuation_scores, model_scorer
from moesaic.model import checkpoint

DEFAULT_GEN_TOKENS = 256


@register_model("moesaic")
class MoesaicLM(LM):
    def __init__(self, path: str, max_length: int | None = None, batch_size: int | str = 8,
                 **_ignored):  # lm-eval passes device, max_batch_size, ...
        super().__init__()
        self.model, meta = perplexity.load_model(path, flag=f"model_args path={path!r}")
        self.tokenizer = load_tokenizer(self.model.cfg.tokenizer)
        self.max_length = int(max_length or checkpoint.trained_seq_len([meta]) or 128)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self._scorer = model_scorer(self.model)
        self.eos_id = self.model.cfg.eos_id

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-probability, is greedy) of each (context, continuation) of token ids."""
        items = []
        for context, continuation in pairs:
            continuation = continuation[-self.max_length:]
            context = (context or [self.eos_id])[-(self.max_length + 1 - len(continuation)):]
            items.append(Item(np.asarray(context, np.int32),
                              (np.asarray(continuation, np.int32),)))
        scores = continuation_scores(self._scorer, items, width=self.max_length + 1,
                                     batch=self.batch_size)
        return [row[0] for row in scores]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [(self._encode(context), self._encode(continuation))
                 for context, continuation in (r.args for r in requests)]
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for (text, *_) in (r.args for r in requests):
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                self._encode(text), self.eos_id, self.max_length, 1)]
            out.append(sum(lp for lp, _ in self._score(windows)) if windows else 0.0)
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for context, kwargs in (r.args for r in requests):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.get("max_gen_toks", DEFAULT_GEN_TOKENS))
            new = max(1, min(new, self.max_length - 1))
            prompt = (self._encode(context) or [self.eos_id])[-(self.max_length - new):]
            temperature = float(kwargs.get("temperature", 0.0) or 0.0)
            if not kwargs.get("do_sample", temperature > 0):
                temperature = 0.0
            tokens = generate(self.model, [np.asarray(prompt, np.int32)], max_new_tokens=new,
                              temperature=temperature, eos_id=self.eos_id,
                              context=self.max_length).tokens[0]
            text = self.tokenizer.decode(tokens)
            cuts = [text.index(u) for u in until if u and u in text]
            out.append(text[:min(cuts)] if cuts else text)
        return out


SPLIT_FIELDS = ("test_split", "validation_split", "training_split", "fewshot_split")


class _AnyTag(yaml.SafeLoader):
    """A YAML loader that reads lm-eval's `!function` tags as plain strings."""


_AnyTag.add_multi_constructor("!", lambda loader, tag, node: loader.construct_scalar(node)
                              if isinstance(node, yaml.ScalarNode) else None)


def check_local_splits(include_path: str, tasks: list[str]) -> None:
    """ValueError naming the task and the file when a task of `include_path` named in
    `tasks` reads local `data_files` and names a split they do not have (lm-eval itself
    fails later with a bare KeyError)."""
    for file in sorted(pathlib.Path(include_path).rglob("*.yaml")):
        config = yaml.load(file.read_text(), Loader=_AnyTag) or {}
        if not isinstance(config, dict) or config.get("task") not in tasks:
            continue
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if not isinstance(files, dict):
            continue
        for field in SPLIT_FIELDS:
            split = config.get(field)
            if split is not None and split not in files:
                raise ValueError(f"task {config['task']!r} ({file}): {field} {split!r} is not "
                                 f"a split of its data_files (it has {sorted(files)})")


def _flag(argv: list[str], name: str) -> list[str]:
    """The values after --name in argv (lm-eval's space- or comma-separated lists)."""
    if name not in argv:
        return []
    values = []
    for arg in argv[argv.index(name) + 1:]:
        if arg.startswith("--"):
            break
        values += [v for v in arg.split(",") if v]
    return values


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line, with "moesaic" registered; local task files checked first."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        for include in _flag(argv, "--include_path"):
            check_local_splits(include, _flag(argv, "--tasks"))
    except ValueError as e:
        print(f"moesaic lm-eval: error: {e}", file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
