"""Recipe validation: every numeric field of a recipe has a range, and a value outside it is a
one-line ConfigError naming the field."""

from __future__ import annotations

import types
from typing import Union, get_args, get_origin

import annotated_types
import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from kembed.cli import app
from kembed.config import RunConfig, apply_overrides, resolve_config
from kembed.errors import ConfigError
from kembed.methods import BUILTIN, get_method

def _types(annotation) -> tuple:
    """The member types of an annotation (``int | None`` -> ``(int, NoneType)``)."""
    return get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)


def numeric_fields(model: type[BaseModel], prefix: tuple[str, ...] = ()):
    """``(path, field, parents)`` of every int or float field of ``model``, nested models included;
    ``parents``: ``(path, model)`` of the optional models above it (off by default: giving the
    field turns them on, with their required fields)."""
    for name, info in model.model_fields.items():
        members = _types(info.annotation)
        nested = [t for t in members if isinstance(t, type) and issubclass(t, BaseModel)]
        if nested:
            parent = [((*prefix, name), nested[0])] if info.default is None else []
            for path, field, parents in numeric_fields(nested[0], (*prefix, name)):
                yield path, field, parent + parents
        elif any(t in (int, float) for t in members):
            yield (*prefix, name), info, []


def allowed(field, value: float) -> bool:
    """Whether ``value`` satisfies the field's declared bounds."""
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Gt) and not value > bound.gt:
            return False
        if isinstance(bound, annotated_types.Ge) and not value >= bound.ge:
            return False
        if isinstance(bound, annotated_types.Lt) and not value < bound.lt:
            return False
        if isinstance(bound, annotated_types.Le) and not value <= bound.le:
            return False
    return True


def cases():
    """(method, path, field, parents) for RunConfig's fields (with the sft method) and every
    built-in method's section."""
    for path, field, parents in numeric_fields(RunConfig):
        yield pytest.param("sft", path, field, parents, id=".".join(path))
    for method in BUILTIN:
        for path, field, parents in numeric_fields(get_method(method).Config, (method,)):
            yield pytest.param(method, path, field, parents, id=".".join(path))


def test_the_cases_cover_every_model():
    ids = {".".join(c.values[1]) for c in cases()}
    # nested models, optional ones and each method's section are all reached
    for key in ("train.batch_size", "train.lora.r", "eval.limit", "prompts.knowledge_max_tokens",
                "raft.teacher.max_new_tokens", "cpt-sft.cpt.block_size", "rlag.chunk_fraction", "simrag.epochs"):
        assert key in ids


@pytest.mark.parametrize("method, path, field, parents", list(cases()))
def test_every_numeric_field_has_a_range(method, path, field, parents):
    bounds = [m for m in field.metadata if isinstance(m, (annotated_types.Gt, annotated_types.Ge,
                                                          annotated_types.Lt, annotated_types.Le))]
    assert bounds, f"{'.'.join(path)} has no declared range"
    for value in (0, -1):
        data = {"method": method}
        for parent, model in parents:  # e.g. raft.teacher needs its model
            apply_overrides(data, [f"{'.'.join((*parent, k))}=x" for k, f in model.model_fields.items()
                                   if f.is_required()])
        apply_overrides(data, [f"{'.'.join(path)}={value}"])
        section = get_method(method).Config
        if allowed(field, value):
            resolve_config(data, section, "recipe.yaml")
            continue
        with pytest.raises(ConfigError) as err:
            resolve_config(data, section, "recipe.yaml")
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"recipe.yaml: {'.'.join(path)}: ")
        assert f"(got {value})" in message


def test_bounds_that_matter():
    """Spot checks of the declared ranges against what the fields mean."""
    train = RunConfig.model_fields["train"].annotation.model_fields
    assert not allowed(train["batch_size"], 0) and not allowed(train["learning_rate"], 0)
    assert allowed(train["warmup_ratio"], 0) and not allowed(train["warmup_ratio"], 1)
    assert allowed(RunConfig.model_fields["validation"], 0)  # 0: train on the whole train split
    rlag = get_method("rlag").Config.model_fields
    assert allowed(rlag["gamma"], 0) and allowed(rlag["eps_chosen"], -1) and not allowed(rlag["eps_chosen"], 0.5)
    assert not allowed(rlag["chunk_fraction"], 0) and allowed(rlag["chunk_fraction"], 1)


def test_train_weights_takes_fp32_or_bf16():
    data = {"method": "sft", "train": {"weights": "bf16", "compile": True}}
    run, _ = resolve_config(data, get_method("sft").Config, "r.yaml")
    assert run.train.weights == "bf16" and run.train.compile is True
    assert RunConfig(method="sft").train.weights == "fp32" and not RunConfig(method="sft").train.compile  # options, off
    with pytest.raises(ConfigError, match=r"^r.yaml: train.weights: Input should be 'fp32' or 'bf16' \(got 'fp16'\)$"):
        resolve_config({"method": "sft", "train": {"weights": "fp16"}}, get_method("sft").Config, "r.yaml")


def test_a_bad_value_on_the_command_line_is_one_line(data_dir, tmp_path):
    result = CliRunner().invoke(app, ["train", "sft", "train.batch_size=0", "--output", str(tmp_path / "run")],
                                catch_exceptions=False)
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    assert "train.batch_size" in result.output and "greater than or equal to 1" in result.output
    assert not (tmp_path / "run").exists()


def test_bf16_weights_under_fp32_fail_before_the_run_exists(data_dir, tmp_path):
    result = CliRunner().invoke(app, ["train", "sft", "train.weights=bf16", "precision=fp32",
                                      "--output", str(tmp_path / "run")], catch_exceptions=False)
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "train.weights = bf16" in result.output
    assert not (tmp_path / "run").exists()
