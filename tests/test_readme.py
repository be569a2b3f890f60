"""The README's first example runs as printed, without a warning; the documents' commands, paths and API table
match the code."""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
import warnings
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _usage_block() -> str:
    text = README.read_text()
    usage = text[text.index("## Usage"):]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


def test_usage_example_runs_without_warnings():
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(_usage_block(), "README.md (Usage)", "exec"), namespace)
    assert namespace["loss"].isfinite()
    assert namespace["x"].grad is not None and namespace["x"].grad.isfinite().all()
    res = namespace["res"]
    assert int(res.n_iters.max()) < 3000
    assert bool((res.marginal_error <= 2e-6).all())  # the final step may land a rounding above tol


# --- The documents' commands, paths and API table against the code --------------------------------------------

ROOT = README.parent
DOCS = ("README.md", "docs/design.md", "benchmarks/RESULTS.md")
OUR_MODULES = re.compile(r"(benchmarks|train|otfast)\.[\w.]+$")
PLACEHOLDERS = {"--section.key"}  # ``--section.key value`` stands for any config key
SHELL_SEPARATORS = {";", "&&", "||", "|", "do", "done"}


def _doc_commands(doc: str) -> list[tuple[str, list[str]]]:
    """Every ``python -m MODULE ARGS`` of this project's modules in ``doc``: in fenced bash blocks (lines
    joined at a trailing backslash, comments left out) and in inline code spans (which may wrap a line)."""
    text = (ROOT / doc).read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines = [line for block in blocks for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
    lines += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    found = []
    for line in lines:
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        if tokens and OUR_MODULES.match(tokens[0]) and line.startswith(tokens[0] + " --"):
            tokens = ["-m", *tokens]  # a command named by its module alone: `benchmarks.launches --device cuda`
        for i, token in enumerate(tokens[:-1]):
            if token == "-m" and OUR_MODULES.match(tokens[i + 1]):
                args = []
                for arg in tokens[i + 2:]:
                    if arg in SHELL_SEPARATORS:
                        break
                    args.append(arg.rstrip(";"))
                    if arg.endswith(";"):
                        break
                found.append((tokens[i + 1], args))
    return found


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The argument parser ``module``'s ``main`` builds (caught at its first parse, before anything runs)."""
    def caught(self, *args, **kwargs):
        raise _Parsed(self)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", caught)
        try:
            importlib.import_module(module).main([])
        except _Parsed as done:
            return done.parser
    raise AssertionError(f"{module}.main([]) did not parse its arguments")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _has_key(config: dict, key: str) -> bool:
    for part in key.replace("-", "_").split("."):
        if not isinstance(config, dict) or part not in config:
            return False
        config = config[part]
    return True


def test_documented_commands_use_options_their_parsers_have(monkeypatch):
    """Every ``python -m X --flag`` in the README, docs/design.md and RESULTS.md names an option of X's parser, or
    (``train.align``; ``train.evaluate xnli|xquad``) a key of its config's defaults."""
    from train.config import DEFAULTS, TASK_DEFAULTS, read_yaml

    commands = [(doc, module, args) for doc in DOCS for module, args in _doc_commands(doc)]
    assert len(commands) > 30, commands  # the extraction still finds them
    parsers: dict[str, argparse.ArgumentParser] = {}
    bad = []
    for doc, module, args in commands:
        if module not in parsers:
            try:
                parsers[module] = _parser_of(module, monkeypatch)
            except ModuleNotFoundError as exc:  # triton, for the resource check, where it is not installed
                if exc.name and exc.name.split(".")[0] in ("otfast", "benchmarks", "train", "kernels"):
                    raise
                continue
        parser, config = parsers[module], None
        if module == "train.align":
            config = DEFAULTS
        elif module == "train.evaluate":
            if not args or args[0] == "TASK":
                continue
            parser = _subparser(parser, args[0])
            if parser is None:
                bad.append(f"{doc}: {module} has no task {args[0]!r}")
                continue
            if args[0] in TASK_DEFAULTS:
                config = read_yaml(TASK_DEFAULTS[args[0]])
        for arg in args:
            flag = arg.strip("[]").split("=", 1)[0]
            if not flag.startswith("--") or flag in PLACEHOLDERS or flag in parser._option_string_actions:
                continue
            if config is not None and _has_key(config, flag[2:]):
                continue
            bad.append(f"{doc}: python -m {module} {' '.join(args)}: no option or config key {flag}")
    assert not bad, "\n".join(bad)


PATH = re.compile(r"(?<![\w./-])((?:otfast|train|kernels|benchmarks|tests|docs|\.ci)/[\w./{}-]*[\w}])")


def test_documented_paths_exist():
    """Every file or folder of the repository the documents name (``train/configs/...``, ``tests/...``) exists;
    ``{lang}`` and NAME stand for any."""
    bad = []
    for doc in DOCS:
        for path in sorted(set(PATH.findall((ROOT / doc).read_text()))):
            pattern = re.sub(r"\{\w+\}|NAME", "*", path)
            if not any(ROOT.glob(pattern)) and not (ROOT / path).exists():
                bad.append(f"{doc}: {path}")
    assert not bad, "missing: " + ", ".join(bad)


def test_config_keys_named_in_the_alignment_section_exist():
    """``--train.keep_checkpoints``, ``model.max_length``, ...: each key the README's "Alignment fine-tuning"
    section names is a key of ``train.align``'s config."""
    from train.config import DEFAULTS

    text = README.read_text()
    section = re.sub(r"```.*?```", "", text[text.index("## Alignment fine-tuning"):text.index("## Evaluation")],
                     flags=re.S)
    keys = {key for span in re.findall(r"`([^`]+)`", section)
            for key in re.findall(r"(?:^|\s|--)((?:model|data|loss|train)\.[\w.]+)", " ".join(span.split()))}
    keys -= {"train.align", "train.evaluate"}  # the modules
    assert len(keys) > 10, keys
    assert not [key for key in sorted(keys) if not _has_key(DEFAULTS, key)]


def test_readme_starts_with_the_two_setup_commands():
    first = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in first.splitlines()] == ["./dev demo", "./dev test"]
    assert README.read_text().index("```bash") < README.read_text().index("\n## ")


def _api_rows() -> dict[str, str]:
    text = README.read_text()
    table = text[text.index("## API"):].split("\n\n", 2)[1]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `(?:otfast\.)?(\w+)\((.*?)\)`", table, re.M)}


def test_api_table_signatures_match_the_code():
    """The README's API table names each function's and SinkhornLoss's parameters in order, with the defaults
    the code has (a parameter written without ``=`` is keyword-only or has no default worth showing)."""
    import inspect

    import otfast

    rows = _api_rows()
    table = README.read_text().split("## API", 1)[1].split("\n\n", 2)[1]
    assert not [name for name in otfast.__all__ if name != "__version__" and f"`{name}" not in table
                and f"`otfast.{name}" not in table and f"{name}(" not in table], "public names missing from the table"
    assert {"sinkhorn", "sinkhorn_loss", "SinkhornLoss", "backends", "word_alignments"} <= set(rows), rows
    for name, documented in rows.items():
        params = {n: p for n, p in inspect.signature(getattr(otfast, name)).parameters.items()
                  if p.kind != p.VAR_KEYWORD and not (name == "sinkhorn" and n == "cost")}  # cost: deprecated name
        doc = [item.strip() for item in documented.split(",") if item.strip() and item.strip() != "*"]
        assert [item.split("=")[0] for item in doc] == list(params), (name, doc, list(params))
        for item in doc:
            if "=" in item:
                key, value = item.split("=", 1)
                assert params[key].default == ast.literal_eval(value), (name, key, value, params[key].default)
