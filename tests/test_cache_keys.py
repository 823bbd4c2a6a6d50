"""KFP cache keys that change when, and only when, they should (issue 22 item 4).

A KFP task's cache key is derived from its component spec (inputs/outputs, the container's
image, command and args) and its input values. :func:`_key_material` rebuilds exactly that
from the compiled YAML for every task; a ``params_yaml`` input that comes from a params-scope
task (``data_params_component`` / ``stage_params_component``) is resolved by running that
task's own function on the run's params text, i.e. the value the task would receive.

- editing ``gates.stage3`` changes gate 3's key only (and the scope tasks', which read the
  whole text): preprocess, training, evaluation and the other gates stay cached;
- a code change (a different content tag: components/image_tag.py) changes the image of every
  container task, hence every key;
- the one declaration (components/step_params.py) is what dvc.yaml lists and what each task
  gets; a task's scoped text must carry every key the step reads (missing = an error, never a
  default), unknown keys stay errors;
- the data steps and the gate give the same outputs from their scoped text as from the whole
  params (tiny data, values away from the defaults).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from components.image_tag import content_digest, content_files, content_ref, load_images
from components.kfp_components import (
    data_params_component,
    params_from_text,
    stage_params_component,
)
from components.ops_params import OpsParams, params_text
from components.step_params import STEP_PARAMS, kfp_keys, parse_scoped, scoped_text
from pipeline_profile import REPO, copy_repo, tiny_profile
from xct_core.errors import ConfigError

SCOPE_TASKS = {"data-params-component": data_params_component}


# --------------------------------------------------------------------------- compiled keys


def _compile(params: OpsParams, out: Path) -> dict:
    from pipelines.kfp_dag import compile_pipeline

    compile_pipeline(out, params)
    return next(yaml.safe_load_all(out.read_text()))


def _tasks(ir: dict) -> dict[str, dict]:
    """Every task of the pipeline (root and nested groups), by its unique task name."""
    dags = [ir["root"]["dag"]] + [c["dag"] for c in ir["components"].values() if "dag" in c]
    return {name: t for dag in dags for name, t in dag["tasks"].items()}


def _scope_outputs(tasks: dict[str, dict], text: str) -> dict[str, dict[str, str]]:
    """What each params-scope task returns for the run's params ``text`` (its own function)."""
    out: dict[str, dict[str, str]] = {}
    for name, task in tasks.items():
        ref = task["componentRef"]["name"]
        if ref == "comp-data-params-component":
            out[name] = data_params_component.python_func(params_yaml=text)._asdict()
        elif ref.startswith("comp-stage-params-component"):
            stage = task["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"]
            out[name] = stage_params_component.python_func(params_yaml=text, stage=int(stage))._asdict()
    return out


def _value(spec: dict, text: str, scopes: dict[str, dict[str, str]]) -> Any:
    """The runtime value of one input parameter (a constant, the run's params text, or a
    scope task's output — directly or as a ``pipelinechannel--<task>-<output>`` of a group)."""
    if "runtimeValue" in spec:
        return spec["runtimeValue"]["constant"]
    if "taskOutputParameter" in spec:
        t = spec["taskOutputParameter"]
        return scopes[t["producerTask"]][t["outputParameterKey"]]
    if "componentInputParameter" not in spec:
        return spec  # the exit task's final status: not a value
    chan = spec["componentInputParameter"].removeprefix("pipelinechannel--")
    if chan == "params_yaml":
        return text
    for task, outs in scopes.items():
        for key, value in outs.items():
            if chan == f"{task}-{key}":
                return value
    return f"<pipeline parameter {chan}>"  # data_uri, ray_address, …: the same in both runs


def _key_material(ir: dict, text: str) -> dict[str, str]:
    """task → the JSON of what KFP hashes into its cache key: the component spec (inputs,
    outputs, the executor's container: image, command, args) and the input values."""
    tasks = _tasks(ir)
    scopes = _scope_outputs(tasks, text)
    executors = ir["deploymentSpec"]["executors"]
    out = {}
    for name, task in tasks.items():
        comp = ir["components"][task["componentRef"]["name"]]
        if "executorLabel" not in comp:
            continue  # a group (dsl.If / ExitHandler), not a task with a cache entry
        inputs = task.get("inputs", {})
        material = {
            "spec": {k: comp.get(k) for k in ("inputDefinitions", "outputDefinitions")},
            "executor": executors[comp["executorLabel"]],
            "parameters": {k: _value(v, text, scopes) for k, v in inputs.get("parameters", {}).items()},
            "artifacts": inputs.get("artifacts", {}),
        }
        out[name] = json.dumps(material, sort_keys=True)
    return out


def _image(material: str) -> str | None:
    return json.loads(material)["executor"].get("container", {}).get("image")


@pytest.fixture(scope="module")
def base_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, str]]:
    params = OpsParams()
    ir = _compile(params, tmp_path_factory.mktemp("base") / "p.yaml")
    return ir, _key_material(ir, params_text(params))


def _display(ir: dict) -> dict[str, str]:
    return {name: t.get("taskInfo", {}).get("name", name) for name, t in _tasks(ir).items()}


def test_editing_gate3_changes_gate3s_key_only(base_keys: tuple[dict, dict[str, str]], tmp_path: Path) -> None:
    ir, before = base_keys
    data = OpsParams().model_dump(mode="json")
    data["gates"]["stage3"]["psnr_window_db"] += 1.0
    edited = OpsParams.model_validate(data)
    ir2 = _compile(edited, tmp_path / "p.yaml")
    after = _key_material(ir2, params_text(edited))
    names = _display(ir)
    assert set(after) == set(before)
    changed = {names[t] for t in before if before[t] != after[t]}
    # the scope tasks read the whole text (cheap; their outputs are what the others get), and
    # register ships the whole params with the model (params.json: serving reads it); a
    # "rejected at gate K" task runs register's rejected path (the audit run logs the params)
    assert changed == {"gate 3", "register", "params", "params stage 1", "params stage 2", "params stage 3",
                       "rejected at gate 1", "rejected at gate 2", "rejected at gate 3"}, changed
    same = {names[t] for t in before if before[t] == after[t]}
    assert {"ingest-component", "validate-component", "preprocess-component", "train stage 1", "train stage 2",
            "train stage 3", "evaluate stage 1", "evaluate stage 2", "evaluate stage 3", "gate 1", "gate 2"} <= same


def test_a_stage2_parameter_reaches_stage2_onward_only(base_keys: tuple[dict, dict[str, str]], tmp_path: Path) -> None:
    ir, before = base_keys
    data = OpsParams().model_dump(mode="json")
    data["train"]["steps"]["stage2"] += 1
    edited = OpsParams.model_validate(data)
    after = _key_material(_compile(edited, tmp_path / "p.yaml"), params_text(edited))
    names = _display(ir)
    changed = {names[t] for t in before if before[t] != after[t]} - {
        "params", "params stage 1", "params stage 2", "params stage 3", "register",
        "rejected at gate 1", "rejected at gate 2", "rejected at gate 3"}  # the whole-params tasks
    assert changed == {"train stage 2"}, changed  # later stages re-run through the new model artifact


def test_a_code_change_changes_every_tasks_key(base_keys: tuple[dict, dict[str, str]], tmp_path: Path) -> None:
    """Compile in a copy of the repo with one line of xct_core changed: every container task
    names a new image (its content tag), so every cache key differs."""
    ir, before = base_keys
    repo = copy_repo(tmp_path / "repo")
    with open(repo / "xct_core" / "metrics.py", "a") as f:
        f.write("\n# a code change\n")
    out = tmp_path / "p.yaml"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("XCT_IMAGE_")}
    env["PYTHONPATH"] = str(repo)
    proc = subprocess.run([sys.executable, "-c", f"from pipelines.kfp_dag import compile_pipeline; "
                           f"compile_pipeline({str(out)!r})"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ir2 = next(yaml.safe_load_all(out.read_text()))
    after = _key_material(ir2, params_text(OpsParams()))
    containers = [t for t in before if _image(before[t])]
    assert len(containers) >= 15
    for t in containers:
        assert _image(before[t]) != _image(after[t]) and before[t] != after[t], t
    images = {_image(before[t]) for t in containers}
    assert images == {content_ref("xct-light:0.1.0", "light"), content_ref("xct-train:0.1.0", "train")}


def test_compiled_images_are_the_content_tags(base_keys: tuple[dict, dict[str, str]]) -> None:
    _, keys = base_keys
    images = load_images()
    tags = {_image(m) for m in keys.values()} - {None}
    assert tags == {f"{images['built'][k]['name']}:{images['built'][k]['tag']}-{content_digest(k)}"
                    for k in ("light", "train")}


# --------------------------------------------------------------------------- the content tag


def _mini_repo(root: Path) -> dict:
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("x = 1\n")
    (root / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    (root / "Dockerfile").write_text("FROM scratch\n")
    (root / "docs.md").write_text("docs\n")
    return {"built": {"light": {"name": "xct-light", "tag": "0.1.0", "content": ["pkg", "Dockerfile"]}}}


def test_content_digest_follows_the_image_files_only(tmp_path: Path) -> None:
    images = _mini_repo(tmp_path)
    assert content_files("light", images, tmp_path) == ["Dockerfile", "pkg/a.py"]
    d0 = content_digest("light", images, tmp_path)
    assert re.fullmatch(r"[0-9a-f]{12}", d0)
    (tmp_path / "docs.md").write_text("other docs\n")  # not in the image's content
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"other junk")
    assert content_digest("light", images, tmp_path) == d0
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")  # a code change
    d1 = content_digest("light", images, tmp_path)
    assert d1 != d0
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    assert content_digest("light", images, tmp_path) == d0  # content, not time
    (tmp_path / "pkg" / "a.py").rename(tmp_path / "pkg" / "b.py")  # same bytes, another path
    assert content_digest("light", images, tmp_path) != d0
    assert content_ref("localhost:5000/xct/xct-light:0.1.0", "light", images, tmp_path).startswith(
        "localhost:5000/xct/xct-light:0.1.0-")
    images["built"]["light"]["content"].append("missing")
    with pytest.raises(FileNotFoundError, match="missing"):
        content_digest("light", images, tmp_path)


def test_every_built_image_lists_its_content() -> None:
    images = load_images()
    for key, spec in images["built"].items():
        files = content_files(key, images)
        assert spec["dockerfile"] in files, key
        assert "requirements/lock.txt" in files, key
    for key in ("light", "train"):
        files = content_files(key, images)
        for pkg in ("xct_core/config.py", "components/train.py", "pipelines/cli.py", "pyproject.toml"):
            assert pkg in files, (key, pkg)


# --------------------------------------------------------------------------- one declaration


def test_dvc_yaml_params_are_the_declaration() -> None:
    """dvc.yaml's params lists are what components/step_params.py declares (for `dvc-sync`)."""
    from dvc.repo import Repo

    from components.step_params import OVERLAY, dvc_entries

    stages = {st.name: st for st in Repo(str(REPO)).index.stages}
    names = list(OpsParams().stages)
    for name, st in stages.items():
        step, _, key = name.partition("@")
        listed = [k for p in st.params for k in p.params] + [str(p.def_path) for p in st.params if not p.params]
        want = [e[0] if isinstance(e, tuple) else e for e in dvc_entries(step, names)]
        want = [w.replace("${key}", key) for w in want]
        assert sorted(listed) == sorted(want), name
        if step in ("train", "evaluate"):
            assert OVERLAY.format(stage=key) in listed


def test_each_task_gets_exactly_its_declared_keys() -> None:
    params = OpsParams()
    data = params.model_dump(mode="json")
    names = list(data["stages"])
    gate3 = json.loads(scoped_text(params, "gate", 3))
    assert gate3["gates"] == {"stage3": data["gates"]["stage3"]} and gate3["registry"] == data["registry"]
    # + what the information ceiling beside the thresholds reads (xct_core/ceiling.py)
    assert set(gate3) == {"gates", "registry", "stages", "data", "preprocess", "hu", "ingest", "eval"}
    assert gate3["data"] == {"synth": data["data"]["synth"]} and set(gate3["eval"]) == {
        "ssim_sigma", "ssim_win", "hu_lo", "hu_hi"}
    train1 = json.loads(scoped_text(params, "train", 1))
    assert "gates" not in train1 and list(train1["stages"]) == ["stage1"]
    assert train1["train"]["steps"] == {"stage1": data["train"]["steps"]["stage1"]}
    assert "pipeline" in train1 and "kfp" not in train1["pipeline"]
    assert json.loads(scoped_text(params, "register")) == data  # register ships the whole params
    train3 = json.loads(scoped_text(params, "train", 3))
    assert list(train3["stages"]) == names  # the earlier stages it loads
    pre = json.loads(scoped_text(params, "preprocess"))
    assert pre["stages"] == {n: {"size": data["stages"][n]["size"], "fov_mm": data["stages"][n]["fov_mm"]}
                             for n in names}
    assert set(pre) == {"stages", "drr", "hu", "data", "preprocess", "eval", "reconstruct"} and pre["hu"] == {"mu_water": 0.02}
    assert pre["eval"] == {"detector": data["eval"]["detector"]}  # the honest views' detector, not the metrics
    assert pre["reconstruct"] == {"min_intensity_fraction": data["reconstruct"]["min_intensity_fraction"]}
    # order-independent: the same keys and values give the same text
    shuffled = dict(reversed(list(data.items())))
    assert scoped_text(OpsParams.model_validate(shuffled), "gate", 3) == scoped_text(params, "gate", 3)
    for step in STEP_PARAMS:
        if step == "synth":
            continue
        stage = 2 if step in ("train", "evaluate", "gate") else None
        assert kfp_keys(step, names, stage)


def test_scoped_text_must_carry_every_key_the_step_reads() -> None:
    params = OpsParams()
    text = scoped_text(params, "validate")
    assert params_from_text(text, step="validate").validation == params.validation
    doc = json.loads(text)
    del doc["ingest"]
    with pytest.raises(ConfigError, match="reads ingest.body_hu"):
        params_from_text(json.dumps(doc), step="validate")
    doc = json.loads(scoped_text(params, "train", 2))
    del doc["train"]["steps"]["stage2"]
    with pytest.raises(ConfigError, match="train.steps.stage2"):
        params_from_text(json.dumps(doc), OpsParams, step="train", stage=2)
    doc = json.loads(scoped_text(params, "train", 2))
    del doc["stages"]["stage1"]  # the earlier stage it loads
    with pytest.raises(ConfigError, match="stages.stage1"):
        params_from_text(json.dumps(doc), OpsParams, step="train", stage=2)
    doc = json.loads(scoped_text(params, "preprocess"))
    del doc["stages"]
    with pytest.raises(ConfigError, match="stages"):
        params_from_text(json.dumps(doc), step="preprocess")
    doc = json.loads(scoped_text(params, "gate", 1))
    doc["registry"]["no_such_key"] = 1  # unknown keys stay errors
    with pytest.raises(ConfigError, match="no_such_key"):
        params_from_text(json.dumps(doc), step="gate", stage=1)
    with pytest.raises(ConfigError, match="empty"):
        params_from_text("", step="gate", stage=1)
    # the whole text is accepted by every step (it carries every key)
    whole = params_text(params)
    assert params_from_text(whole, OpsParams, step="train", stage=3) == params


def test_unread_parts_are_completed_fail_closed() -> None:
    """A gate the step does not read is one nothing passes; a grid-only stage entry a valid
    placeholder network; the read keys are the real values."""
    params = OpsParams()
    train2 = params_from_text(scoped_text(params, "train", 2), OpsParams, step="train", stage=2)
    assert train2.stages["stage2"] == params.stages["stage2"] and train2.train.ray == params.train.ray
    assert train2.gates["stage1"].psnr_window_db >= 1e9
    pre = params_from_text(scoped_text(params, "preprocess"), step="preprocess")
    assert [(s.size, s.fov_mm) for s in pre.stages.values()] == [(s.size, s.fov_mm) for s in params.stages.values()]
    assert pre.drr == params.drr and pre.preprocess == params.preprocess
    gate = params_from_text(scoped_text(params, "gate", 2), step="gate", stage=2)
    assert gate.gates["stage2"] == params.gates["stage2"] and gate.gates["stage1"].psnr_window_db >= 1e9
    assert parse_scoped(params.model_dump(mode="json"), "gate", 2)["gates"] == params.model_dump(mode="json")["gates"]


# --------------------------------------------------------------------------- same outputs


def _away_from_defaults() -> OpsParams:
    """The tiny profile with more values off their defaults (a step reading an undeclared key
    would see the default instead and its output would differ)."""
    data = tiny_profile(n_stages=2)
    data["data"]["ct"].update(air_hu=-150.0, max_implausible_fraction=0.01)
    data["ingest"].update(split_seed=3, body_hu=-450.0)
    data["validation"].update(min_body_fraction=0.02, max_hu_max=4500.0)
    data["drr"].update(step_fraction=0.4)
    data["hu"].update(mu_water=0.019)
    data["preprocess"].update(fill_hu=-1000.0)
    data["seed"] = 5
    data["gates"]["stage1"].update(min_std_ratio=0.1)
    data["registry"].update(model_name="xct-scoped-test")
    return OpsParams.model_validate(data)


def _strip(doc: Any) -> Any:
    """A JSON record without the file-system bookkeeping (mtimes) that differs between runs."""
    if isinstance(doc, dict):
        return {k: _strip(v) for k, v in doc.items() if k != "mtime_ns"}
    if isinstance(doc, list):
        return [_strip(v) for v in doc]
    return doc


def _files(root: Path) -> dict[str, Any]:
    """Every output file: bytes; JSON files parsed, with the run's folder and mtimes taken out."""
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            out[rel] = (_strip(json.loads(p.read_text().replace(str(root), "<root>"))) if p.suffix == ".json"
                        else p.read_bytes())
    return out


def test_data_steps_give_the_same_outputs_from_scoped_and_whole_text(tmp_path: Path) -> None:
    from components.kfp_components import (
        ingest_component,
        preprocess_component,
        validate_component,
    )
    from xct_core.phantoms.dataset import write_phantoms

    params = _away_from_defaults()
    whole = params_text(params)
    raw = tmp_path / "raw"
    write_phantoms(raw, params.data.synth, preview=False)
    outs: dict[str, dict[str, bytes]] = {}
    for label, texts in (("whole", {s: whole for s in ("ingest", "validate", "preprocess")}),
                         ("scoped", {s: scoped_text(params, s) for s in ("ingest", "validate", "preprocess")})):
        root = tmp_path / label
        interim = SimpleNamespace(path=str(root / "interim"), metadata={})
        ingest_component.python_func(raw=SimpleNamespace(path=str(raw)), interim=interim, params_yaml=texts["ingest"])
        validated = SimpleNamespace(path=str(root / "validated"), metadata={})
        html = SimpleNamespace(path=str(root / "html" / "report.html"))
        validate_component.python_func(interim=interim, validated=validated, report_html=html,
                                       params_yaml=texts["validate"])
        processed = SimpleNamespace(path=str(root / "processed"), metadata={})
        preprocess_component.python_func(interim=interim, validated=validated, processed=processed,
                                         params_yaml=texts["preprocess"])
        outs[label] = _files(root)
    assert outs["whole"].keys() == outs["scoped"].keys() and len(outs["whole"]) > 10
    differ = [f for f in outs["whole"] if outs["whole"][f] != outs["scoped"][f] and not f.endswith(".html")]
    assert not differ, differ[:10]

