"""Leave-one-speaker-out table: how well each audio front end predicts a speaker's mouth.

For every tracked clip (``benchmarks/prior_corpus.py`` makes them) and every front end, the
correlation of the predicted lip opening (articulation code dimension 0, ``inner_opening``)
with the tracked one, three ways:

- **clip only** (gstalk before the prior): the per-avatar regressor the fine stage fits,
  trained on the clip's own frames; each of ``--folds`` contiguous folds predicted by a
  regressor fitted on the others (early stopping on the last tenth of those);
- **prior**: a prior fitted on the *other speakers'* clips, predicting every frame;
- **prior + adapt**: that prior fine-tuned on the clip's own frames outside the fold, as the
  fine stage does (early stopping keeps the prior when adapting does not pay).

The clips' A/V offsets come from :func:`gstalk.prior.estimate_offsets` on the same front end;
correlations are taken at that offset. Usage::

    python benchmarks/articulation_loso.py corpus_ws/* --features mfcc fbank phones fbank+phones --json out.json

Prints a Markdown table (mean over clips, and per clip with ``--per-clip``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

SPEAKERS = {  # clips of one person (the rest: one speaker per clip)
    "obama": "obama", "obama-clip1_styletalk": "obama", "obama-clip2_styletalk": "obama",
    "obama-clip3_styletalk": "obama", "andrewng-clip1_styletalk": "andrewng", "andrewng-clip2_styletalk": "andrewng",
    "feifeili-clip2_styletalk": "feifeili", "feifeili-clip3_styletalk": "feifeili",
    "grid_id2_vcd_swwp2s": "grid_s2", "grid_pwij3p": "grid_s2",
}


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b) + 1e-12))


def folds(n: int, k: int) -> list[np.ndarray]:
    edges = np.linspace(0, n, k + 1).round().astype(int)
    return [np.arange(edges[i], edges[i + 1]) for i in range(k)]


def clip_cv(clip, start_state, args, seed: int = 0) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Within-clip K-fold predictions [N, D]: a fresh ensemble (or one starting from
    ``start_state``) fitted on the other folds of the clip predicts each fold."""
    from gstalk.deform.articulation import ArticulationEnsemble, fit_ensemble

    x = torch.from_numpy(clip.shifted_windows())
    y = torch.from_numpy(clip.targets)
    pred = np.zeros(clip.targets.shape)
    n = len(x)
    for f in folds(n, args.folds):
        train = torch.from_numpy(np.setdiff1d(np.arange(n), f))
        torch.manual_seed(seed)
        ens = ArticulationEnsemble(x.shape[2], x.shape[1], 32, args.smooth, y.shape[1], args.members)
        lr, steps = 1e-3, args.clip_steps
        if start_state is not None:
            ens.load_state_dict(start_state)
            lr, steps = args.adapt_lr, args.adapt_steps
        fit_ensemble(ens, x, y, train, steps=steps, lr=lr, seed=seed)
        with torch.no_grad():
            pred[f] = ens.predict_sequence(x).double().numpy()[f]
    return pred


def main(argv: list[str] | None = None) -> int:
    from gstalk.prior import PriorSettings, clip_from_workspace, estimate_offsets, fit_prior, predict_clip

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspaces", nargs="+", type=Path)
    ap.add_argument("--features", nargs="+", default=["mfcc", "fbank", "phones", "fbank+phones"])
    ap.add_argument("--members", type=int, default=2, help="regressors per ensemble (the fine stage uses 5)")
    ap.add_argument("--smooth", type=int, default=5)
    ap.add_argument("--prior-steps", type=int, default=1500)
    ap.add_argument("--clip-steps", type=int, default=1000)
    ap.add_argument("--adapt-steps", type=int, default=300)
    ap.add_argument("--adapt-lr", type=float, default=3e-4)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["clip", "prior", "adapt"])
    ap.add_argument("--speed", nargs="*", type=float, default=[],
                    help="also fit the priors on speed-perturbed copies of the other speakers' clips "
                         "(e.g. --speed 0.9 1.1; gstalk.audio.perturb); the held-out clips stay as recorded")
    ap.add_argument("--seed", type=int, default=0, help="the priors' seed (PriorSettings.seed)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--per-clip", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for fe in args.features:
        t0 = time.perf_counter()
        clips = [clip_from_workspace(p, fe, speaker=SPEAKERS.get(p.name, p.name)) for p in args.workspaces]
        offsets = estimate_offsets(clips)
        for c in clips:
            c.offset = int(offsets[c.name]["offset"])
        res: dict[str, dict[str, float]] = {c.name: {"frames": len(c.targets), "offset": c.offset} for c in clips}
        copies = [clip_from_workspace(p, fe, speaker=c.speaker, speed=s, offset=c.offset)
                  for s in args.speed if s != 1.0 for p, c in zip(args.workspaces, clips)]
        if "clip" in args.modes:
            for c in clips:
                res[c.name]["clip"] = corr(clip_cv(c, None, args)[:, 0], c.targets[:, 0])
        if {"prior", "adapt"} & set(args.modes):
            for s in sorted({c.speaker for c in clips}):
                rest = [c for c in clips + copies if c.speaker != s]
                prior = fit_prior(rest, PriorSettings(members=args.members, smooth=args.smooth,
                                                      steps=args.prior_steps, seed=args.seed), fe, {})
                for c in (c for c in clips if c.speaker == s):
                    res[c.name]["prior"] = corr(predict_clip(prior.ensemble, c.shifted_windows())[:, 0],
                                                c.targets[:, 0])
                    if "adapt" in args.modes:
                        res[c.name]["adapt"] = corr(clip_cv(c, prior.ensemble.state_dict(), args)[:, 0],
                                                    c.targets[:, 0])
        results[fe] = res
        means = {m: float(np.mean([r[m] for r in res.values()])) for m in args.modes}
        print(f"# {fe}: " + ", ".join(f"{m} {v:.3f}" for m, v in means.items())
              + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    names = {"clip": "clip only", "prior": "prior (other speakers)", "adapt": "prior + adapt"}
    print("| front end | " + " | ".join(names[m] for m in args.modes) + " |")
    print("|---|" + "---|" * len(args.modes))
    for fe, res in results.items():
        print(f"| {fe} | " + " | ".join(f"{np.mean([r[m] for r in res.values()]):.3f}" for m in args.modes) + " |")
    if args.per_clip:
        for fe, res in results.items():
            print(f"\n{fe}\n| clip | frames | offset | " + " | ".join(names[m] for m in args.modes) + " |")
            print("|---|---|---|" + "---|" * len(args.modes))
            for k, r in res.items():
                print(f"| {k} | {r['frames']} | {r['offset']:+d} | " + " | ".join(f"{r[m]:.2f}" for m in args.modes)
                      + " |")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"workspaces": [str(p) for p in args.workspaces],
                                                                    "json": str(args.json)},
                                         "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
