"""Quality per step count on the built-in ``shapes`` images, scored by the shapes GenEval suite.

Training goes through the bundled quickstart recipes (``quickstart``, ``quickstart_meanflow``,
``quickstart_selfe``, ``quickstart_alphaflow``, ``quickstart_imf``, ``quickstart_tim``, ``quickstart_sct``,
``quickstart_ect``, ``quickstart_shortcut``, ``quickstart_imm``) and the project's ``train_recipe``. To give
every method the same budget, each recipe keeps its own ``method:`` and ``sample:`` sections (the method's
hyperparameters and its sampler: CFG scale, guidance rule, r rule) and takes the ``model:`` and ``train:``
sections of the flow-matching quickstart (the same U-Net, optimiser, learning rate, EMA), with the run length
and batch of the budget. Schedules a recipe states in steps (warm-up, Self-E's tau ramp, sCT's tangent warm-
up, ECT's stages) are scaled with the run length; Self-E's grid shift is set to ``e^mu`` of the U-Net's token
count, the rule its recipe states for its own network. A method that samples only with powers of two
(Shortcut) takes the nearest one for other step counts (50 -> 64, recorded as ``steps_used``).

Scoring is what ``selfe eval geneval --suite shapes`` does: images in the official GenEval layout
(``generate_layout``, image k of prompt i with noise seed ``seed + i n + k``), the CPU shapes detector and
the official rules (``evaluate_folder``, ``summarize``), on ``shapes_prompts(per_tag=...)``.
Already-trained run directories can be scored instead (``--runs``).
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import NETWORK_OPTIONS
from selfe_cli.errors import UserError

NETWORK_OPTION_KEYS = sorted({key for options in NETWORK_OPTIONS.values() for key in options})

QUICKSTARTS = {"flow_matching": "quickstart", "meanflow": "quickstart_meanflow", "selfe": "quickstart_selfe",
               "alphaflow": "quickstart_alphaflow", "imf": "quickstart_imf", "tim": "quickstart_tim",
               "sct": "quickstart_sct", "ect": "quickstart_ect", "shortcut": "quickstart_shortcut",
               "imm": "quickstart_imm"}


@dataclass
class ShapesBudget:
    total_steps: int = 300
    batch_size: int = 32
    resolution: int = 32
    per_tag: int | None = 4     # prompts per GenEval tag (6 tags); None: GenEval's counts (484 prompts)
    n_per_prompt: int = 1       # images per prompt
    seed: int = 0
    steps: tuple[int, ...] = (1, 2, 4, 8, 50)
    methods: tuple[str, ...] = ("flow_matching", "meanflow", "selfe", "alphaflow", "imf", "tim", "sct", "ect", "shortcut", "imm")
    same_network: bool = True   # all on the flow-matching quickstart's U-Net (else each recipe's own)
    precision: str = "fp32"
    compile: bool = False


def _scaled(value: int, recipe_steps: int, total_steps: int) -> int:
    return max(0, round(value * total_steps / recipe_steps))


def budget_recipes(b: ShapesBudget, runs_root: Path) -> dict[str, Any]:
    """The quickstart recipes of ``b.methods`` with the shared budget applied (validated ``Recipe`` objects)."""
    from selfe_cli.recipes.loader import find_recipe, parse_recipe, read_yaml

    base = read_yaml(find_recipe(QUICKSTARTS["flow_matching"]))
    out = {}
    for name in b.methods:
        if name not in QUICKSTARTS:
            raise UserError(f"--methods: no quickstart recipe for {name!r} (known: {', '.join(QUICKSTARTS)})")
        path = find_recipe(QUICKSTARTS[name])
        raw = copy.deepcopy(read_yaml(path))
        recipe_steps = int(raw["train"]["total_steps"])
        if b.same_network:
            # options a method needs of the network (iMF's guidance inputs, sCT's log-variance head), as the
            # recipe sets them
            needs = {key: raw["model"][key] for key in NETWORK_OPTION_KEYS if key in raw["model"]}
            raw["model"] = copy.deepcopy(base["model"])
            raw["train"] = copy.deepcopy(base["train"])
            raw["model"].update(needs)
        train = raw["train"]
        train["warmup_steps"] = _scaled(int(train.get("warmup_steps", 0)), recipe_steps, b.total_steps)
        train.update(total_steps=b.total_steps, batch_size=b.batch_size, checkpoint_every_steps=b.total_steps,
                     sample_every_steps=0, log_every_steps=max(1, b.total_steps // 10), precision=b.precision,
                     compile=b.compile)
        method = raw["method"]
        if method.get("tau_anneal_steps") is not None:
            method["tau_anneal_steps"] = _scaled(int(method["tau_anneal_steps"]), recipe_steps, b.total_steps)
        if method.get("tangent_warmup_steps") is not None:  # sCT
            method["tangent_warmup_steps"] = _scaled(int(method["tangent_warmup_steps"]), recipe_steps, b.total_steps)
        if method.get("stage_steps") is not None:  # ECT: as many stages as the recipe's run
            method["stage_steps"] = max(1, _scaled(int(method["stage_steps"]), recipe_steps, b.total_steps))
        raw["data"]["resolution"] = b.resolution
        raw["run"] = {**raw.get("run", {}), "seed": b.seed, "name": f"bench-{name}", "dir": str(runs_root / name)}
        raw.setdefault("sample", {})["grid_size"] = 4  # the end-of-run grid is not part of the benchmark
        recipe = parse_recipe(raw, f"{path} (benchmark budget)", default_name=path.stem)
        if name == "selfe" and b.same_network:
            from selfe_cli.methods.selfe import SelfE

            patch = int(recipe.model.kwargs.get("patch_size", 1) or 1)
            recipe.sample.shift = SelfE(recipe.method.config).sampling_shift((b.resolution // patch) ** 2)
        out[name] = recipe
    return out


def label_runs(run_dirs: list[Path]) -> dict[str, Path]:
    """``--runs`` directories labelled by their method (and directory name where a method repeats)."""
    from selfe_cli.recipes.loader import load_resolved

    labels: dict[str, Path] = {}
    for run in run_dirs:
        if not (Path(run) / "recipe.yaml").is_file():
            raise UserError(f"--runs {run}: not a run directory (expected {Path(run) / 'recipe.yaml'})")
        name = load_resolved(Path(run)).method.name
        labels[name if name not in labels else f"{name} ({Path(run).name})"] = Path(run)
    return labels


def allowed_steps(sampler_defaults: dict[str, Any], k: int) -> int:
    """``k``, or for a method that samples only with powers of two (Shortcut) the nearest one in log scale up to
    its finest step (50 -> 64): the column keeps its label, the record its ``steps_used``."""
    most = sampler_defaults.get("power_of_two_steps")
    if not most or not k & (k - 1) and k <= most:
        return k
    return min(most, 2 ** round(math.log2(k)))


def score_run(run_dir: Path, b: ShapesBudget, out_dir: Path, device: torch.device) -> dict[str, Any]:
    """GenEval (shapes suite) summary at each step count for one trained run."""
    from selfe_cli.cli.eval_cmd import generate_layout
    from selfe_cli.data.shapes import shapes_prompts
    from selfe_cli.evaluation.geneval import evaluate_folder, summarize
    from selfe_cli.evaluation.shapes_detector import ShapesDetector
    from selfe_cli.sampling.generate import Generator

    gen = Generator.from_run(run_dir, device=device)
    if gen.cond_kind != "text":
        raise UserError(f"--runs {run_dir}: the shapes GenEval suite needs a text-to-image model")
    prompts = shapes_prompts(seed=b.seed, per_tag=b.per_tag)
    detector = ShapesDetector()
    res: dict[str, Any] = {"run_dir": str(run_dir), "sampler": {
        "cfg_scale": gen.sample_cfg.cfg_scale, "guidance": gen.sample_cfg.guidance, "shift": gen.sample_cfg.shift,
        "r_mode": gen.sample_cfg.r_mode or gen.sampler_defaults.get("r_mode")}, "steps": {}}
    for k in b.steps:
        folder = out_dir / f"steps-{k}"
        start = time.perf_counter()
        generate_layout(gen, prompts, folder, steps=allowed_steps(gen.sampler_defaults, k), n_per_prompt=b.n_per_prompt,
                        seed=b.seed, cfg_scale=None, batch_size=64)
        gen_s = time.perf_counter() - start
        summary = summarize(evaluate_folder(folder, detector))
        res["steps"][k] = {"overall": summary["overall"], "tags": summary["tags"], "counts": summary["counts"],
                           "images": summary["images"], "generate_seconds": gen_s,
                           "steps_used": allowed_steps(gen.sampler_defaults, k)}
    return res


def run(b: ShapesBudget, device: torch.device, *, runs: list[Path] | None = None, work_dir: Path | None = None,
        log=print) -> dict[str, Any]:
    from selfe_cli.data.shapes import shapes_prompts

    record: dict[str, Any] = {"budget": asdict(b), "prompts": len(shapes_prompts(seed=b.seed, per_tag=b.per_tag)),
                              "results": {}}
    with tempfile.TemporaryDirectory(prefix="selfe-bench-shapes-") as tmp:
        root = Path(work_dir) if work_dir else Path(tmp)
        if runs:
            record["trained_here"] = False
            record["budget"].pop("total_steps")
            record["budget"].pop("batch_size")
            labelled = label_runs(runs)
        else:
            from selfe_cli.training.run import train_recipe

            record["trained_here"] = True
            labelled = {}
            for name, recipe in budget_recipes(b, root / "runs").items():
                log(f"shapes: training {name} via {QUICKSTARTS[name]} ({b.total_steps} steps, batch {b.batch_size})")
                start = time.perf_counter()
                train_recipe(recipe, progress=False, device=device.type)
                record.setdefault("train_seconds", {})[name] = time.perf_counter() - start
                labelled[name] = Path(recipe.run.dir)
        for name, run_dir in labelled.items():
            log(f"shapes: scoring {name} at {', '.join(map(str, b.steps))} steps")
            record["results"][name] = score_run(run_dir, b, root / "eval" / name.replace(" ", "_"), device)
    return record
