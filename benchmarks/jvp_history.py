"""MeanFlow's JVP engine against an earlier revision's, in one interleaved run (same machine, same minute).

    python -m benchmarks.jvp_history --rev 6627c92           # the engine before issue 10
    python -m benchmarks.jvp_history --rev 6627c92 --models unet --rounds 12

The earlier revision's ``methods/jvp.py`` and ``methods/meanflow.py`` are read with ``git show`` and loaded
as separate modules (their imports of those two files pointed at each other; everything else comes from
the current package), so both engines train the same network on the same batches, round by round. Each
configuration is a method spec as in ``benchmarks.speed`` (``name:key=value+...``), prefixed with ``old:``
for the earlier revision. Prints a table and writes ``benchmarks/results/jvp-history-<time>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_info, utc_now
from benchmarks.speed import _conditions, parse_spec
from selfe_cli.models.registry import build_model

ROOT = Path(__file__).resolve().parent.parent
MODELS = {  # the CPU suite's speed networks (benchmarks/__main__.py)
    "unet": {"sample_size": 32, "in_channels": 3, "model_channels": 16, "channel_mult": [1, 2, 2], "num_blocks": 1,
             "attn_resolutions": [8], "condition": "class", "num_classes": 10},
    "DiT-tiny/2": {"sample_size": 16, "in_channels": 3, "condition": "class", "num_classes": 10},
}
DEFAULT_SPECS = ("flow_matching", "old:meanflow", "old:meanflow:memory_saving=true+jvp_only_r_neq_t=true",
                 "meanflow", "meanflow:jvp_mode=two_pass")


def load_revision(rev: str) -> types.ModuleType:
    """The earlier revision's ``meanflow`` module, with its own ``jvp`` module beside it."""
    def source(path: str) -> str:
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout

    jvp = types.ModuleType(f"selfe_jvp_{rev}")
    sys.modules[jvp.__name__] = jvp  # before exec: dataclasses look their module up there
    exec(compile(source("src/selfe_cli/methods/jvp.py"), f"{rev}:jvp.py", "exec"), jvp.__dict__)  # noqa: S102
    text = source("src/selfe_cli/methods/meanflow.py").replace("from selfe_cli.methods.jvp import",
                                                               f"from {jvp.__name__} import")
    mf = types.ModuleType(f"selfe_meanflow_{rev}")
    sys.modules[mf.__name__] = mf
    exec(compile(text, f"{rev}:meanflow.py", "exec"), mf.__dict__)  # noqa: S102
    return mf


def make_method(spec: str, old: types.ModuleType | None) -> Any:
    from benchmarks.common import get_method
    from selfe_cli.config import from_dict

    if spec.startswith("old:"):
        name, overrides = parse_spec(spec[4:])
        if name != "meanflow":
            raise SystemExit(f"{spec}: only meanflow has an old engine")
        return old.MeanFlow(from_dict(old.MeanFlowConfig, overrides, "method"))
    name, overrides = parse_spec(spec)
    return get_method(name, overrides)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.jvp_history", description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="6627c92", help="the earlier revision (git)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--specs", default=",".join(DEFAULT_SPECS))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    old = load_revision(args.rev)
    specs = [s for s in args.specs.split(",") if s]
    record: dict[str, Any] = {"started": utc_now(), "machine": machine_info(), "rev": args.rev,
                              "batch_size": args.batch_size, "rounds": args.rounds, "torch": torch.__version__,
                              "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.jvp_history",
                                                   *(argv if argv is not None else sys.argv[1:])]),
                              "rows": []}
    for model in [m for m in args.models.split(",") if m]:
        kwargs = MODELS[model]
        torch.manual_seed(0)
        base = build_model(model, **kwargs)
        x0 = torch.randn(args.batch_size, base.in_channels, base.sample_size, base.sample_size,
                         generator=torch.Generator().manual_seed(0))
        cond, null = _conditions(base, args.batch_size, torch.device("cpu"))
        setups = []
        for spec in specs:
            net = copy.deepcopy(base).train()
            setups.append({"spec": spec, "method": make_method(spec, old), "net": net, "times": [],
                           "opt": torch.optim.Adam(net.parameters(), lr=1e-5, fused=True)})

        def step(s: dict[str, Any], i: int, x0: torch.Tensor = x0, cond: Any = cond, null: Any = null) -> float:
            torch.manual_seed(i)  # the same t, r, noise for every configuration in a round
            start = time.perf_counter()
            out = s["method"].loss(s["net"], x0, cond, null_cond=null, step=i, total_steps=1000)
            out.loss.backward()
            s["opt"].step()
            s["opt"].zero_grad(set_to_none=True)
            return time.perf_counter() - start

        for s in setups:
            for i in range(2):
                step(s, i)
        for i in range(args.rounds):
            for s in setups:
                s["times"].append(step(s, 100 + i))
        base_t = statistics.median(setups[0]["times"])
        for s in setups:
            med = statistics.median(s["times"])
            record["rows"].append({"model": model, "spec": s["spec"], "median_s": med, "ratio": med / base_t,
                                   "times_s": s["times"]})
            print(f"{model:12s} {s['spec']:58s} {med * 1e3:8.1f} ms  {med / base_t:.3f}x", flush=True)
    out = args.out or ROOT / "benchmarks" / "results" / f"jvp-history-{record['started'][:19].replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
