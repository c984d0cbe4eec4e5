"""One path per policy: the launch environment and the YAML settings files each have one reader.

Static checks over the package's source (no process group, no files): a second copy of either policy
coming back fails here, naming the file and line.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cryofastar_core.runtime.errors import InputError

PACKAGE = Path(__file__).resolve().parents[1] / "cryofastar_core"
LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "CRYOFASTAR_DIST_TIMEOUT_S"}
YAML_READERS = {"load", "safe_load", "full_load", "unsafe_load", "load_all", "safe_load_all", "full_load_all",
                "unsafe_load_all"}


def _sources() -> list[tuple[str, ast.AST]]:
    return [(str(p.relative_to(PACKAGE.parent)), ast.parse(p.read_text(), filename=str(p)))
            for p in sorted(PACKAGE.rglob("*.py"))]


def _uses(predicate) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for name, tree in _sources():
        lines = [node.lineno for node in ast.walk(tree) if predicate(node)]
        if lines:
            found[name] = lines
    return found


def test_only_one_module_reads_the_launch_and_joins_a_process_group():
    def launch_variable(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value in LAUNCH_VARIABLES

    def torch_init(node: ast.AST) -> bool:  # torch.distributed.init_process_group, however imported
        if isinstance(node, ast.Attribute):
            return node.attr == "init_process_group"
        if isinstance(node, ast.ImportFrom):
            return (node.module or "").startswith("torch") and any(a.name == "init_process_group" for a in node.names)
        return False

    assert set(_uses(launch_variable)) == {"cryofastar_core/runtime/distributed.py"}, _uses(launch_variable)
    assert set(_uses(torch_init)) == {"cryofastar_core/runtime/distributed.py"}, _uses(torch_init)


def test_only_one_module_reads_yaml_settings():
    def yaml_read(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr in YAML_READERS and isinstance(node.value, ast.Name)
                and node.value.id == "yaml")

    assert set(_uses(yaml_read)) == {"cryofastar_core/runtime/yaml_config.py"}, _uses(yaml_read)


def test_training_and_the_job_share_the_launch_types():
    from cryofastar_core.runtime import distributed
    from cryofastar_core.runtime import communicator as job_distributed
    from cryofastar_core.training import trainer

    assert trainer.DistInfo is distributed.DistEnv is job_distributed.DistEnv
    assert job_distributed.dist_env is distributed.dist_env and job_distributed.rank_device is distributed.rank_device


def test_launch_environment(monkeypatch):
    from cryofastar_core.runtime.distributed import DEFAULT_TIMEOUT_S, DistEnv, dist_env, dist_timeout, rank_device

    for var in LAUNCH_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    assert dist_env() == DistEnv(0, 1, 0) and dist_timeout().total_seconds() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert dist_env() == DistEnv(3, 4, 3)  # LOCAL_RANK defaults to RANK
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_env() == DistEnv(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(InputError, match="not in a world of 4"):
        dist_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(InputError, match="not integers"):
        dist_env()
    monkeypatch.setenv("CRYOFASTAR_DIST_TIMEOUT_S", "60")
    assert dist_timeout().total_seconds() == 60
    monkeypatch.setenv("CRYOFASTAR_DIST_TIMEOUT_S", "soon")
    with pytest.raises(InputError) as err:
        dist_timeout()
    assert err.value.field == "CRYOFASTAR_DIST_TIMEOUT_S"
    assert rank_device("cpu", DistEnv(1, 2, 1)) == "cpu" and rank_device("cuda:1", DistEnv()) == "cuda:1"


def test_one_yaml_reader_for_step_files_and_training_configs(tmp_path):
    from cryofastar_core.job.step_file import read_step_file
    from cryofastar_core.training.config import load_train_config

    step = tmp_path / "step.yaml"
    # A bool field (refine_global) and a float written without a dot (a string to PyYAML): both copies
    # of the loader used to differ here (AssertionError / refused).
    step.write_text("refine_global: false\nkeep-fraction: 5e-1\nthreads: null\n")
    assert read_step_file(step) == {"refine_global": False, "keep_fraction": 0.5, "threads": None}
    step.write_text("veiws: 16\n")
    with pytest.raises(InputError) as err:
        read_step_file(step)
    assert err.value.field == "veiws" and "did you mean 'views'" in err.value.fix
    step.write_text("refine_global: maybe\n")
    with pytest.raises(InputError, match="not true or false"):
        read_step_file(step)

    train = tmp_path / "train.yaml"
    train.write_text("box: 16\nstage: {name: A, steps: 2, batch-size: 2, veiws_min: 4}\n")
    with pytest.raises(InputError) as err:
        load_train_config(train)
    assert err.value.path == train and err.value.field == "stages[0].veiws_min"
    assert "did you mean 'views_min'" in err.value.fix
    train.write_text("box: 16\nstage: {name: A, steps: 2, batch-size: 2, lr: 1e-3}\n")
    cfg = load_train_config(train)
    assert cfg.stages[0].batch_size == 2 and cfg.stages[0].lr == pytest.approx(1e-3)


def _engine_sources() -> list[tuple[str, ast.AST]]:
    """The engine: the package without its command line (``cli/``, the terminal front end)."""
    return [(name, tree) for name, tree in _sources() if not name.startswith("cryofastar_core/cli/")]


def test_the_engine_reports_progress_only_through_the_callback():
    """No tqdm (nor the terminal renderer) in the engine: progress is the caller's ``progress(stage, done,
    total)`` (cryofastar_core.runtime.progress), and each front end chooses how to show it."""
    found: dict[str, list[int]] = {}
    for name, tree in _engine_sources():
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(m == "tqdm" or m.startswith("tqdm.") or m.startswith("cryofastar_core.cli") for m in modules):
                found.setdefault(name, []).append(node.lineno)
    assert not found, found
    assert "cryofastar_core/runtime/progress.py" in dict(_engine_sources())


def _backprojector_inserts(tree: ast.AST) -> list[tuple[str, int]]:
    """``(enclosing function, line)`` of every ``x.insert(...)`` call that is not ``list.insert(i, v)`` (two
    positional arguments) nor ``DataFrame.insert(loc, "column", value)`` (a string constant second); a
    function nested in another is named ``outer.inner``."""
    calls = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name if function == "<module>" else f"{function}.{node.name}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "insert":
            args = node.args
            list_insert = len(args) == 2 and not node.keywords
            frame_insert = len(args) >= 2 and isinstance(args[1], ast.Constant) and isinstance(args[1].value, str)
            if not (list_insert or frame_insert):
                calls.append((function, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return calls


def test_half_set_insertion_has_one_path():
    """Every half-set reconstruction (half maps, the job's per-rank shares, refinement's passes) inserts
    through reconstruct.backproject.insert_half_sets; Backprojector.insert is otherwise called only by the
    one-map ``reconstruct``."""
    found = {name: calls for name, tree in _sources() if (calls := _backprojector_inserts(tree))}
    assert set(found) == {"cryofastar_core/reconstruct/backproject.py"}, found
    assert sorted(f for f, _ in found["cryofastar_core/reconstruct/backproject.py"]) == \
        ["insert_half_sets.insert_half", "reconstruct"], found


def test_the_terminal_renderer_draws_one_bar_per_stage():
    import io

    from cryofastar_core.cli.progress import TqdmProgress, terminal_progress

    assert terminal_progress(stream=io.StringIO()) is None  # not a terminal (a log file, a pipe): nothing drawn

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    bars = terminal_progress(stream=term)
    assert isinstance(bars, TqdmProgress)
    for stage, done, total in [("poses", 16, 80), ("poses", 80, 80), ("refine: global search", 40, 80),
                               ("refine: global search", 80, 80), ("refine: global search", 80, 80),
                               ("reconstruct", 10, 80)]:
        bars(stage, done, total)
    bars.close()
    text = term.getvalue()
    assert "poses: 100%" in text and "80/80" in text and "refine: global search: 100%" in text
    assert "reconstruct:  12%" in text and "10/80" in text
