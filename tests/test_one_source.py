"""One source of defaults, and operational params out of the science layer (issue 20, items 1-2).

* params.yaml is the documented default file: it spells out every key, and the code's
  defaults (``Params()``, ``OpsParams()``) equal it on every key (overlays aside).
* Components take the params they are given: no ``params or Params()`` fall-back, no
  built-in construction in components/ or pipelines/; commands resolve ``--params`` /
  ``$XCT_PARAMS`` / ./params.yaml (else the built-in defaults = params.yaml) and honour
  ``--overlay`` / ``--set``; a KFP task given no params text fails in one line.
* The operational sections (s3, pipeline, hpo, train.ray) are validated by their own
  modules; no science step of dvc.yaml imports those, so editing an S3 knob (its default or
  its value in params.yaml) leaves every science stage up to date (real ``dvc status``).
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli_run import xct
from components.ops_params import OpsParams
from components.ray_params import RayParams
from xct_core.config import OPS_SECTIONS, Params, load_params, params_from_dict, parse_set, resolve_params
from xct_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _params_yaml_without_overlays() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data.pop("overlays", None)
    return data


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Every leaf path where ``a`` and ``b`` differ (``<missing>`` where one lacks a key)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}" if path else str(k))]
    return [] if a == b else [f"{path}: code {a!r} != params.yaml {b!r}"]


# --------------------------------------------------------------------------- one source


@pytest.mark.parametrize("schema", [Params, RayParams, OpsParams])
def test_code_defaults_are_params_yaml_on_every_key(schema: type[Params]) -> None:
    """``Params()`` (and the operations layer's models) == params.yaml without its overlays."""
    code = schema().model_dump(mode="json")
    file = params_from_dict(_params_yaml_without_overlays(), "params.yaml", schema).model_dump(mode="json")
    assert _diff(code, file) == []


def test_params_yaml_spells_out_every_key() -> None:
    """The documented default file names every key of every section (list items and free-form
    mappings aside), so reading it tells every default."""
    raw = _params_yaml_without_overlays()
    free_form = {"train.steps", "hpo.steps", "hpo.space", "train.ray.resources_per_worker", "eval.samples",
                 "eval.sample_steps", "pipeline.kfp.retries"}

    def missing(model: dict, data: Any, path: str = "") -> list[str]:
        if path in free_form or not isinstance(model, dict):
            return []
        out = []
        for k, v in model.items():
            sub = f"{path}.{k}" if path else k
            if not isinstance(data, dict) or k not in data:
                out.append(sub)
            else:
                out += missing(v, data[k], sub)
        return out

    assert missing(OpsParams().model_dump(mode="json"), raw) == []


def test_a_changed_code_default_is_caught() -> None:
    """The comparison above can fail: a model whose default differs from params.yaml shows up."""
    from pydantic import Field

    from xct_core.config import ReconstructParams

    class Drifted(ReconstructParams):
        samples: int = Field(1, ge=1)

    data = _params_yaml_without_overlays()["reconstruct"]
    assert _diff(Drifted().model_dump(mode="json"), Drifted.model_validate(data).model_dump(mode="json")) == [
        "samples: code 1 != params.yaml 8"]


# --------------------------------------------------------------------------- no silent fall-back


def _calls_named(tree: ast.AST, names: set[str]) -> list[int]:
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and not n.args and not n.keywords
            and isinstance(n.func, ast.Name) and n.func.id in names]


def test_no_component_or_command_builds_default_params() -> None:
    """Components and commands use the params they are given or found: no ``Params()`` (or
    ``OpsParams()``/``RayParams()``) is built in components/ or pipelines/ outside the one
    resolver (xct_core.config.resolve_params) and the KFP DAG's compile-time default."""
    allowed = {("pipelines/kfp_dag.py", "OpsParams")}  # build_pipeline(None): the defaults = params.yaml
    found = []
    for folder in ("components", "pipelines"):
        for f in sorted((REPO / folder).rglob("*.py")):
            rel = str(f.relative_to(REPO))
            tree = ast.parse(f.read_text())
            for name in ("Params", "OpsParams", "RayParams"):
                if (rel, name) not in allowed:
                    found += [f"{rel}:{line} {name}()" for line in _calls_named(tree, {name})]
    assert found == []


def test_component_functions_require_their_params() -> None:
    """No step function in components/ has a default for ``params`` (the nine ``params or
    Params()`` fall-backs are gone: a caller must hand the params over)."""
    import importlib

    defaults = []
    for f in sorted((REPO / "components").glob("*.py")):
        mod = importlib.import_module(f"components.{f.stem}")
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if fn.__module__ != mod.__name__:
                continue
            p = inspect.signature(fn).parameters.get("params")
            if p is not None and p.default is not inspect.Parameter.empty:
                defaults.append(f"components/{f.name}:{name}")
    assert defaults == []


def test_an_empty_params_text_is_an_error_not_the_defaults() -> None:
    from components.kfp_components import params_from_text

    for text in ("", "  \n", "{}"):
        with pytest.raises(ConfigError, match="params_yaml is empty"):
            params_from_text(text)
    text = yaml.safe_dump({"reconstruct": {"samples": 3}})
    assert params_from_text(text).reconstruct.samples == 3


def test_the_compiled_pipeline_defaults_to_its_compile_time_params(tmp_path: Path) -> None:
    """A run submitted without ``params_yaml`` (the KFP UI) uses the params the pipeline was
    compiled with (here an overlay's), not the code's built-in defaults."""
    overlay = tmp_path / "ov.yaml"
    overlay.write_text("gates: {stage1: {psnr_window_db: 31.5}}\nreconstruct: {samples: 5}\n")
    out = tmp_path / "p.yaml"
    assert xct(["pipeline", "compile", "--out", str(out), "--overlay", str(overlay), "--set", "eval.max_volumes=3"]) == 0
    ir = yaml.safe_load_all(out.read_text()).__next__()
    default = ir["root"]["inputDefinitions"]["parameters"]["params_yaml"]["defaultValue"]
    compiled = yaml.safe_load(default)
    assert compiled["gates"]["stage1"]["psnr_window_db"] == 31.5 and compiled["reconstruct"]["samples"] == 5
    assert compiled["eval"]["max_volumes"] == 3
    # the rest is the whole file (relative gates included), not an empty text
    assert compiled["gates"]["stage2"]["relative"] and compiled["s3"]["region"] == "us-east-1"


def _metrics(path: Path, psnr: float) -> Path:
    path.write_text(json.dumps({"stage": 1, "psnr_window_db": psnr, "ssim_window": 0.9, "nan_count": 0, "std": 0.4,
                                "target_std": 0.5, "test_ids_hash": "abc", "baseline_psnr_window_db": psnr - 10,
                                "psnr_window_body_db": psnr - 4}))
    return path


def test_a_step_command_uses_the_file_overlay_and_set_it_is_given(tmp_path: Path) -> None:
    """`xct step gate` judges with the thresholds of the params file it is given, then its
    --overlay, then --set (each beats the one before); never the built-in ones."""
    m = _metrics(tmp_path / "m.json", 30.0)
    base = _params_yaml_without_overlays()
    base["gates"]["stage1"]["relative"] = []  # no champion lookup (no registry here)
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(base))

    def verdict(*extra: str) -> bool:
        out = tmp_path / f"g{len(list(tmp_path.glob('g*.json')))}.json"
        assert xct(["step", "gate", "--stage", "1", "--metrics", str(m), "--out", str(out), "--params", str(pfile),
                    *extra]) == 0
        return json.loads(out.read_text())["passed"]

    assert verdict() is True  # 30 dB > the file's 28
    ov = tmp_path / "strict.yaml"
    ov.write_text("gates: {stage1: {psnr_window_db: 35.0}}\n")
    assert verdict("--overlay", str(ov)) is False
    assert verdict("--overlay", str(ov), "--set", "gates.stage1.psnr_window_db=29.5") is True
    base["gates"]["stage1"]["psnr_window_db"] = 31.0
    pfile.write_text(yaml.safe_dump(base))
    assert verdict() is False  # the file's own value, not the code's 28


def test_resolution_order_and_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XCT_PARAMS", raising=False)
    # none found: the built-in defaults, which are params.yaml's values
    assert _diff(resolve_params().model_dump(mode="json"),
                 params_from_dict(_params_yaml_without_overlays()).model_dump(mode="json")) == []
    assert resolve_params(sets=["reconstruct.samples=2"]).reconstruct.samples == 2
    # ./params.yaml found
    (tmp_path / "params.yaml").write_text("reconstruct: {samples: 4}\n")
    assert resolve_params().reconstruct.samples == 4
    # $XCT_PARAMS wins, and must exist when set
    (tmp_path / "other.yaml").write_text("reconstruct: {samples: 6}\n")
    monkeypatch.setenv("XCT_PARAMS", str(tmp_path / "other.yaml"))
    assert resolve_params().reconstruct.samples == 6
    monkeypatch.setenv("XCT_PARAMS", str(tmp_path / "gone.yaml"))
    with pytest.raises(ConfigError, match="gone.yaml: params file not found"):
        resolve_params()


def test_set_parses_dotted_keys_and_yaml_values() -> None:
    assert parse_set("train.ray.num_workers=2") == {"train": {"ray": {"num_workers": 2}}}
    assert parse_set("eval.samples={stage1: 4}") == {"eval": {"samples": {"stage1": 4}}}
    assert parse_set("hu.window=[-100, 200]") == {"hu": {"window": [-100, 200]}}
    assert parse_set("train.experiment='123'") == {"train": {"experiment": "123"}}
    for bad in ("train.steps", "=3", "a..b=1", "x=[1"):
        with pytest.raises(ConfigError, match="--set"):
            parse_set(bad)
    p = load_params(REPO / "params.yaml", sets=["train.val_every=7"])
    assert p.train.val_every == 7
    with pytest.raises(ConfigError, match="--set train.val_evry=7.*val_evry"):
        load_params(REPO / "params.yaml", sets=["train.val_evry=7"])


def test_old_per_value_flags_are_set_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.commands.params import alias_sets

    assert alias_sets(["a.b=1"], **{"train.ray.num_workers": 3, "train.ray.use_gpu": False, "x.y": None}) == [
        "train.ray.num_workers=3", "train.ray.use_gpu=false", "a.b=1"]
    assert alias_sets(None, **{"validation.policy": "quarantine"}) == ["validation.policy=quarantine"]


# --------------------------------------------------------------------------- operations layer


def test_science_params_know_the_operational_sections_by_name_only() -> None:
    data = _params_yaml_without_overlays()
    science = params_from_dict(data)
    assert not any(hasattr(science, k) for k in OPS_SECTIONS) and not hasattr(science.train, "ray")
    ops = params_from_dict(data, "params.yaml", OpsParams)
    assert ops.s3.read_timeout_s == 30.0 and ops.train.ray.cpus_per_worker == 2.0 and ops.hpo.metric == "psnr_window_db"
    # the same file, the same lineage digest, whichever model loaded it; an S3 knob leaves it alone
    assert science.digest() == ops.digest()
    data["s3"]["read_timeout_s"] = 99.0
    assert params_from_dict(data, "p", OpsParams).digest() == ops.digest()
    data["train"]["lr_typo"] = 1
    # unknown keys stay errors: in a science section, in an operational one, at the top level
    for schema in (Params, OpsParams):
        with pytest.raises(ConfigError, match="train.lr_typo"):
            params_from_dict(data, "p", schema)
    with pytest.raises(ConfigError, match="s3.regoin"):
        params_from_dict({"s3": {"regoin": "x"}}, "p", OpsParams)
    with pytest.raises(ConfigError, match="train.ray.num_worker"):
        params_from_dict({"train": {"ray": {"num_worker": 2}}}, "p", RayParams)
    with pytest.raises(ConfigError, match="s4"):
        params_from_dict({"s4": {}}, "p")


def test_no_science_step_imports_an_operational_schema() -> None:
    """The import closures of dvc.yaml's science steps (tests/test_dvc_pipeline.py ENTRIES)
    reach neither components/ops_params.py nor xct_core/hpo_params.py."""
    from import_closure import closure
    from test_dvc_pipeline import ENTRIES

    for name, (_, _, entries) in ENTRIES.items():
        files = set(closure(entries))
        assert "components/ops_params.py" not in files and "xct_core/hpo_params.py" not in files, name
    assert "components/ray_params.py" in closure(ENTRIES["train"][2])  # train reads train.ray


@pytest.mark.integration  # real dvc on a copy of the repo (≈ 11 s): not in `make test-fast`
@pytest.mark.timeout(300)
def test_dvc_status_after_an_s3_edit_leaves_the_science_stages_up_to_date() -> None:
    """Real DVC: a copy of the repo with every stage committed (placeholder outputs, `dvc
    commit`), then an S3 timeout changed in params.yaml AND in its schema module, a KFP retry
    default changed, an HPO default changed: `dvc status` finds at most the register stage
    stale (it ships the whole xct_core folder with the model). Control: touching
    xct_core/config.py makes every stage stale."""
    import shutil

    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    from pipeline_profile import copy_repo, short_tmpdir, step_env

    root = short_tmpdir("xone")
    try:
        repo = copy_repo(root / "repo")
        env = step_env(root, repo)
        dvc = str(Path(sys.executable).parent / "dvc")
        r = Repo(str(repo))
        paths = {Path(o.def_path) for st in r.index.stages for o in st.outs}
        paths |= {Path(d.def_path) for st in r.index.stages for d in st.deps if not isinstance(d, ParamsDependency)}
        r.close()
        for rel in sorted(paths):
            p = repo / rel
            if p.exists():
                continue
            if p.suffix:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("{}\n" if p.suffix == ".json" else "x\n")
            else:
                p.mkdir(parents=True, exist_ok=True)
                (p / "placeholder").write_text("x\n")

        def run(*args: str) -> subprocess.CompletedProcess:
            proc = subprocess.run([dvc, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            return proc

        def stale() -> list[str]:
            return sorted(json.loads(run("status", "--json").stdout or "{}"))

        def edit(rel: str, old: str, new: str) -> None:
            text = (repo / rel).read_text()
            assert text.count(old) == 1, (rel, old)
            (repo / rel).write_text(text.replace(old, new))

        run("commit", "-f", "-q")
        assert stale() == []
        edit("params.yaml", "read_timeout_s: 30.0", "read_timeout_s: 31.0")
        edit("components/ops_params.py", "read_timeout_s: float = Field(30.0", "read_timeout_s: float = Field(31.0")
        edit("components/ops_params.py", "backoff_factor: float = Field(2.0", "backoff_factor: float = Field(3.0")
        assert stale() == []
        edit("xct_core/hpo_params.py", "val_every: int = Field(25", "val_every: int = Field(26")
        assert stale() == ["register"]
        (repo / "xct_core/config.py").write_text((repo / "xct_core/config.py").read_text() + "\n# edited\n")
        assert len(stale()) == len(list(Repo(str(repo)).index.stages))
    finally:
        shutil.rmtree(root, ignore_errors=True)
