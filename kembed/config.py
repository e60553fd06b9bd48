"""Recipes: YAML files that configure a training run, with ``key=value`` overrides.

A recipe holds the fields of ``RunConfig`` plus one section named after the method (for
example ``rlag:``) that the method's own ``Config`` model validates. Unknown keys anywhere are
an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kembed.errors import ConfigError
from kembed.prompts import PromptFormat

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class Strict(BaseModel):
    """A pydantic model that rejects unknown keys."""

    model_config = ConfigDict(extra="forbid")


class LoraSettings(Strict):
    """LoRA adapter settings (``peft.LoraConfig``)."""

    r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class TrainConfig(Strict):
    """Optimiser settings shared by every method (the trainer backend reads them).

    ``batch_size`` is the global micro-batch of one step: under N processes each trains
    ``batch_size / N`` examples (it must divide); an optimiser step sees ``batch_size * grad_accum``.
    ``weights`` and ``compile`` are speed options (docs/performance.md); their checks against the
    placement are :func:`kembed.trainer.check_train_options`.
    """

    learning_rate: float = Field(1e-5, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    lr_scheduler: str = "constant_with_warmup"  # a transformers scheduler name, or cosine_warmup_constant
    max_grad_norm: float = Field(1.0, ge=0)  # 0: no clipping
    weight_decay: float = Field(0.0, ge=0)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    checkpoints: bool = True  # keep a resumable checkpoint after every epoch (weights + optimiser)
    # the dtype of the weights being trained: fp32 (under a bf16 placement, bf16 autocast over fp32
    # weights) or bf16 (pure bf16, as the RLAG authors train: no autocast, torch-optimi's AdamW with
    # Kahan summation; needs a bf16 placement; the saved model is bf16). See kembed.trainer.fit.
    weights: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False  # torch.compile (inductor) the model for training; the first steps compile
    lora: LoraSettings | None = None


class EvalDuringTraining(Strict):
    """Closed-book accuracy measured after each iteration, as ``kembed eval`` measures it
    (``split: null`` turns it off). ``validation`` is the split held out of the train split
    (``RunConfig.validation``); any other name is one of the domain's own splits."""

    split: str | None = "validation"
    limit: int | None = Field(None, ge=1)  # score only the first N records of the split (None: all)


class RunConfig(Strict):
    """The method-independent part of a recipe.

    ``seed`` and ``data_seed`` are apart so that several training seeds train on one sample:
    ``data_seed`` draws the training records and the validation split, ``seed`` everything
    random in training. ``knowledge`` bounds the domain text any method reads while training,
    the same for every method of a comparison: ``records``, the knowledge snippets of the run's
    training records only; ``knowledge-base``, the domain's whole corpus as in the papers
    (:func:`kembed.retrieval.domain_documents`; on current-events it holds the test questions'
    snippets verbatim). It governs CPT's corpus, RAFT's distractor pool and SimRAG's Stage-II
    documents and round-trip index (:meth:`kembed.train.TrainContext.knowledge_documents`).
    """

    method: str
    model: str = "smollm2-135m-instruct"
    init_from: str | None = None  # start from this run's weights (e.g. SFT after a CPT run)
    domain: str = "current-events"
    data_dir: str | None = None
    seed: int = Field(42, ge=0)  # the training seed: initialisation, data order, sampling (varies across a bench's seeds)
    data_seed: int = Field(42, ge=0)  # draws the training sample and the validation split (fixed across training seeds)
    knowledge: Literal["records", "knowledge-base"] = "records"  # the domain text any method may read
    limit: int | None = Field(None, ge=1)  # train on a seeded random sample of this many train records (None: all)
    # train records held out as the validation split (seeded); None: sized to the domain, 20% of
    # its train split and at most 100 (kembed.data.auto_validation)
    validation: int | None = Field(None, ge=0)
    device: str = "auto"
    precision: str = "auto"
    prompts: PromptFormat = Field(default_factory=PromptFormat)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalDuringTraining = Field(default_factory=EvalDuringTraining)


def recipe_path(method: str, recipe: str | Path | None) -> Path:
    """The recipe file: ``recipe`` if given (a path, or a name in ``recipes/``), else
    ``recipes/<method>.yaml``.

    Raises:
        ConfigError: the file does not exist.
    """
    if recipe is None:
        path = RECIPES_DIR / f"{method}.yaml"
    else:
        path = Path(recipe)
        if not path.exists() and (RECIPES_DIR / f"{recipe}.yaml").exists():
            path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    return path


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (``["a", "b"]``, YAML-parsed value).

    Raises:
        ConfigError: no ``=`` or an empty key.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key=value")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``key=value`` in the nested dict ``data`` (in place) and return it."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return data


def _fmt_error(source: str, err: ValidationError, prefix: str = "") -> ConfigError:
    first = err.errors()[0]
    key = prefix + ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return ConfigError(f"{source}: unknown key '{key}'")
    return ConfigError(f"{source}: {key}: {first['msg']} (got {first.get('input')!r})")


def resolve_config(data: dict, method_config_cls: type[BaseModel], source: str) -> tuple[RunConfig, BaseModel]:
    """Validate a recipe dict into (``RunConfig``, the method's config).

    Raises:
        ConfigError: an unknown key or a value of the wrong type, naming the key.
    """
    data = dict(data)
    method = data.get("method")
    section = (data.pop(method, None) if isinstance(method, str) else None) or {}
    try:
        run = RunConfig.model_validate(data)
    except ValidationError as e:
        raise _fmt_error(source, e) from None
    try:
        method_cfg = method_config_cls.model_validate(section)
    except ValidationError as e:
        raise _fmt_error(source, e, prefix=f"{method}.") from None
    return run, method_cfg


def load_recipe_dict(path: Path) -> dict:
    """Read a recipe YAML file into a dict.

    Raises:
        ConfigError: invalid YAML or not a mapping.
    """
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys to values")
    return data


def dump_config(run: RunConfig, method_cfg: BaseModel) -> dict:
    """The resolved config as one plain dict (what ``config.yaml`` in a run directory holds)."""
    out = run.model_dump(mode="json")
    out[run.method] = method_cfg.model_dump(mode="json")
    return out
